// fuzz-max-len: 600
//
// Segment headers: `SegmentHeader.decode(_:byteOffset:)` (§4).
//
// Input: mode byte, then the header bytes.
//   bit 0  fix checksum: cut/pad to 512 bytes and write XXH3-64 (seed 0) of [0, 504) at 504
//   bit 1  fix magic first ("LPSEGMNT")
// Properties: never traps; an accepted header re-encodes to a header that decodes equal
// (strict mode: to the same bytes; §4 says bytes [40, 504) are zero).
import LogPoolFormat

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let input = fuzzBytes(data, size)
    guard let first = input.first else { return 0 }
    let mode = FuzzMode(raw: first)
    var bytes = Array(input.dropFirst())
    if mode.bit(1) {
        bytes = fitted(bytes[...], to: SegmentHeaderLayout.byteCount)
        for (i, b) in SegmentHeaderLayout.magic.enumerated() { bytes[i] = b }
    }
    if mode.fixChecksum {
        bytes = fitted(bytes[...], to: SegmentHeaderLayout.byteCount)
        bytes.seal(to: SegmentHeaderLayout.checksumOffset, seed: 0, at: SegmentHeaderLayout.checksumOffset)
    }
    let byteOffset = FuzzFixture.geometry.segmentByteOffset(3)
    do throws(CorruptionError) {
        let header = try SegmentHeader.decode(bytes, byteOffset: byteOffset)
        fuzzCheck(header.poolUUID.count == 16, "pool UUID of \(header.poolUUID.count) bytes")
        let again = header.encode()
        fuzzCheck(again.count == SegmentHeaderLayout.byteCount, "encode wrote \(again.count) bytes")
        do throws(CorruptionError) {
            fuzzCheck(try SegmentHeader.decode(again, byteOffset: byteOffset) == header, "segment header round trip changed the value")
        } catch {
            fuzzFail("re-encoded segment header does not decode: \(error)")
        }
        if fuzzStrict { fuzzCheck(again == bytes, "accepted segment header is not canonical") }
    } catch {
        _ = error.description
    }
    return 0
}
