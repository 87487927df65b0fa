// Shared by every fuzz target and by the corpus generator (Fuzz/build.sh compiles this
// file into each of them). Only LogPoolFormat is assumed here.
import LogPoolFormat

#if canImport(Glibc)
import Glibc
#endif

/// The fixed identity every target and every seed uses, so that seeds written by
/// `Fuzz/build.sh --corpus` verify in the targets: pool UUID 00 01 02 ... 0f.
enum FuzzFixture {
    static let poolUUID: [UInt8] = Array(0..<16)
    static let salt: UInt64 = Superblock.salt(of: poolUUID)

    /// A small valid geometry (4 MiB pool, 4 KiB blocks, 64 KiB segments: 59 segments).
    static let geometry: PoolGeometry = geometry(capacity: 4 << 20, block: 4096, segment: 64 << 10)

    /// Alternative geometries for the checkpoint target (block size changes which
    /// volume sizes are legal; segment size changes the usage-table length).
    static let geometries: [PoolGeometry] = [
        geometry,
        geometry(capacity: 4 << 20, block: 512, segment: 64 << 10),
        geometry(capacity: 16 << 20, block: 65536, segment: 1 << 20),
        geometry(capacity: 64 << 20, block: 4096, segment: 1 << 20),
    ]

    static func geometry(capacity: UInt64, block: UInt32, segment: UInt32) -> PoolGeometry {
        switch PoolGeometry.make(capacityByteCount: capacity, blockByteCount: block, segmentByteCount: segment) {
        case .success(let g): return g
        case .failure(let e): fatalError("fuzz fixture geometry: \(e)")
        }
    }

    /// A file offset inside segment `index`'s payload (after its header page).
    static func payloadOffset(_ g: PoolGeometry, segment index: Int, page: Int) -> UInt64 {
        g.segmentByteOffset(index) + UInt64(PoolGeometry.segmentHeaderByteCount) + UInt64(page) * 4096
    }
}

/// Strict mode (`LOGPOOL_FUZZ_STRICT=1`): besides "never trap", also require that an
/// accepted encoding is canonical (re-encoding the decoded value gives the same bytes)
/// where the format says unused bytes are zero. Off by default: those are spec-leniency
/// findings, not crashes, and one of them would stop every run at once.
let fuzzStrict: Bool = {
    guard let v = getenv("LOGPOOL_FUZZ_STRICT") else { return false }
    return String(cString: v) == "1"
}()

/// A broken property: report it as a crash (libFuzzer saves the input).
func fuzzFail(_ message: @autoclosure () -> String, file: StaticString = #fileID, line: UInt = #line) -> Never {
    fatalError("fuzz property violated: \(message())", file: file, line: line)
}

func fuzzCheck(_ condition: Bool, _ message: @autoclosure () -> String,
               file: StaticString = #fileID, line: UInt = #line) {
    if !condition { fuzzFail(message(), file: file, line: line) }
}

/// Input helpers. libFuzzer hands over (pointer, size); targets copy into an array.
func fuzzBytes(_ data: UnsafePointer<UInt8>, _ size: Int) -> [UInt8] {
    size > 0 ? Array(UnsafeBufferPointer(start: data, count: size)) : []
}

/// `bytes` cut or zero-padded to exactly `count` bytes.
func fitted(_ bytes: ArraySlice<UInt8>, to count: Int) -> [UInt8] {
    var out = Array(bytes.prefix(count))
    if out.count < count { out += repeatElement(0, count: count - out.count) }
    return out
}

extension Array where Element == UInt8 {
    func le64(at offset: Int) -> UInt64 {
        var v: UInt64 = 0
        for i in 0..<8 { v |= UInt64(self[offset + i]) << (8 * UInt64(i)) }
        return v
    }

    func le32(at offset: Int) -> UInt32 {
        var v: UInt32 = 0
        for i in 0..<4 { v |= UInt32(self[offset + i]) << (8 * UInt32(i)) }
        return v
    }

    func le16(at offset: Int) -> UInt16 { UInt16(self[offset]) | UInt16(self[offset + 1]) << 8 }

    mutating func put64(_ value: UInt64, at offset: Int) {
        for i in 0..<8 { self[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
    }

    mutating func put32(_ value: UInt32, at offset: Int) {
        for i in 0..<4 { self[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt32(i))) }
    }

    mutating func put16(_ value: UInt16, at offset: Int) {
        self[offset] = UInt8(truncatingIfNeeded: value)
        self[offset + 1] = UInt8(truncatingIfNeeded: value >> 8)
    }

    /// XXH3-64 of [start, end) with `seed`, stored little-endian at `at` (how every
    /// checksummed structure but the journal record is sealed).
    mutating func seal(from start: Int = 0, to end: Int, seed: UInt64, at: Int) {
        let sum = Checksum.xxh3(self[start..<end], seed: seed)
        put64(sum, at: at)
    }
}

/// Journal record checksum: XXH3-64 (seed = salt) of header bytes [0, 40) then the
/// payload [48, count), written at 40. Mirrors `JournalRecord.encode(salt:into:)`.
func sealJournalRecord(_ bytes: inout [UInt8], salt: UInt64) {
    guard bytes.count >= JournalRecordLayout.headerByteCount else { return }
    let sum = bytes.withUnsafeBytes { raw -> UInt64 in
        var state = XXH3Streaming(seed: salt)
        state.update(UnsafeRawBufferPointer(rebasing: raw[0..<JournalRecordLayout.checksumOffset]))
        state.update(UnsafeRawBufferPointer(rebasing: raw[JournalRecordLayout.headerByteCount...]))
        return state.digest()
    }
    bytes.put64(sum, at: JournalRecordLayout.checksumOffset)
}

/// The mode byte every format target reads first. Bit 0: fix checksums after mutation;
/// the other bits are target specific (see each target and Fuzz/README.md).
struct FuzzMode {
    var raw: UInt8
    var fixChecksum: Bool { raw & 1 != 0 }
    func bit(_ n: Int) -> Bool { raw & (1 << UInt8(n)) != 0 }
}
