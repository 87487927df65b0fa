// fuzz-max-len: 20000
//
// LZ4 stored blocks: `BlockCompression.decompress(_:into:)` (what reading a compressed
// block runs after its external checksum matched) and `BlockCompression.compress`.
//
// Input: mode byte, size selector byte, then bytes.
//   size selector % 16  destination (block) size: 512 ... 65536 (powers of two), then the
//                       odd sizes 1, 100, 4095, 4097, 65535, 65537, 131072 and 0
//   mode bit 1  round trip: the bytes are block contents; compress them with the limit
//               "smaller than the input" and require that decompressing into the input's
//               length gives them back
// Otherwise the bytes are a stored LZ4 block, decompressed into the selected size.
// There is no checksum mode: a stored block's checksum lives outside it (in the block
// table), so the engine hands decompress any bytes whose checksum matched.
// Properties: never traps; no access out of bounds (ASan for the Swift side, guard
// bytes around the destination for liblz4, which is not instrumented); round trips hold.
import LogPoolFormat

private let sizes = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 1, 100, 4095, 4097, 65535, 65537, 131072, 0]

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let input = fuzzBytes(data, size)
    guard input.count >= 2 else { return 0 }
    let mode = FuzzMode(raw: input[0])
    let blockSize = sizes[Int(input[1]) & 15]
    // Exactly the payload, in its own allocation, so ASan sees any overread.
    let source = Array(input.dropFirst(2))

    if mode.bit(1) {
        guard !source.isEmpty else { return 0 }
        let compressed = source.withUnsafeBytes { BlockCompression.compress($0, limitByteCount: source.count) }
        if let compressed {
            fuzzCheck(!compressed.isEmpty && compressed.count < source.count,
                      "compress returned \(compressed.count) bytes for a limit of \(source.count)")
            var out = [UInt8](repeating: 0xA5, count: source.count)
            let ok = compressed.withUnsafeBytes { c in
                out.withUnsafeMutableBytes { BlockCompression.decompress(c, into: $0) }
            }
            fuzzCheck(ok, "compressed block does not decompress")
            fuzzCheck(out == source, "LZ4 round trip changed the bytes")
        }
        return 0
    }

    // liblz4 is a system library, not instrumented: ASan does not see its own accesses.
    // Guard bytes on both sides of the destination catch a write outside it.
    let guardBytes = 64
    var out = [UInt8](repeating: 0xA5, count: blockSize + 2 * guardBytes)
    let ok = source.withUnsafeBytes { s in
        out.withUnsafeMutableBytes { raw in
            BlockCompression.decompress(s, into: UnsafeMutableRawBufferPointer(rebasing: raw[guardBytes..<guardBytes + blockSize]))
        }
    }
    fuzzCheck(out[..<guardBytes].allSatisfy { $0 == 0xA5 } && out[(guardBytes + blockSize)...].allSatisfy { $0 == 0xA5 },
              "decompress wrote outside its destination")
    if ok {
        fuzzCheck(blockSize > 0 && !source.isEmpty, "decompress succeeded on an empty buffer")
    }
    return 0
}
