// fuzz-max-len: 8192
//
// Checkpoint roots: `CheckpointRoot.decode(_:expectedChecksum:salt:byteOffset:geometry:)`
// (§6: header, volume table, segment usage table) against a small valid geometry.
//
// Input: mode byte, geometry selector byte, then the root bytes.
//   selector % 4  geometry: 4 MiB/4 KiB blocks/64 KiB segments (59 segments),
//                 4 MiB/512 B blocks/64 KiB, 16 MiB/64 KiB blocks/1 MiB, 64 MiB/4 KiB/1 MiB
//   mode bit 0  fix checksum: zero-pad to whole sectors, write XXH3-64 (seed = fixture
//               salt) of everything but the last 8 bytes into them, and expect it from the
//               superblock
//   mode bit 1  fix layout first: magic, declared size = byte count, segment count =
//               the geometry's
//   mode bit 2  the superblock's checksum disagrees (off by one)
// Without bit 0 the superblock expects whatever trailer the bytes carry.
// Properties: never traps; an accepted root re-encodes to a root that decodes equal
// (strict mode: to the same bytes).
import LogPoolFormat

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let input = fuzzBytes(data, size)
    guard input.count >= 2 else { return 0 }
    let mode = FuzzMode(raw: input[0])
    let geometry = FuzzFixture.geometries[Int(input[1]) % FuzzFixture.geometries.count]
    let byteOffset = FuzzFixture.payloadOffset(geometry, segment: 1, page: 0)
    var bytes = Array(input.dropFirst(2))

    func padToSectors() {
        let sectors = max(1, (bytes.count + PoolGeometry.sectorByteCount - 1) / PoolGeometry.sectorByteCount)
        bytes = fitted(bytes[...], to: sectors * PoolGeometry.sectorByteCount)
    }
    if mode.bit(1) {
        padToSectors()
        for (i, b) in CheckpointRoot.magic.enumerated() { bytes[i] = b }
        bytes.put64(UInt64(bytes.count), at: 8)
        bytes.put32(geometry.segmentCount, at: 64)
    }
    var expected: UInt64 = 0
    if mode.fixChecksum {
        padToSectors()
        bytes.seal(to: bytes.count - 8, seed: FuzzFixture.salt, at: bytes.count - 8)
        expected = bytes.le64(at: bytes.count - 8)
    } else if bytes.count >= 8 {
        expected = bytes.le64(at: bytes.count - 8)
    }
    if mode.bit(2) { expected &+= 1 }

    do throws(CorruptionError) {
        let root = try CheckpointRoot.decode(bytes, expectedChecksum: expected, salt: FuzzFixture.salt,
                                             byteOffset: byteOffset, geometry: geometry)
        fuzzCheck(root.segmentLiveByteCounts.count == Int(geometry.segmentCount), "usage table length")
        fuzzCheck(Set(root.volumes.map(\.id)).count == root.volumes.count, "duplicate volume ids accepted")
        fuzzCheck(Set(root.volumes.map(\.name)).count == root.volumes.count, "duplicate volume names accepted")
        fuzzCheck(root.encodedByteCount <= bytes.count, "encoded root longer than the accepted bytes")
        let (again, sum) = root.encode(salt: FuzzFixture.salt)
        fuzzCheck(again.count == root.encodedByteCount, "encode wrote \(again.count) bytes")
        do throws(CorruptionError) {
            let back = try CheckpointRoot.decode(again, expectedChecksum: sum, salt: FuzzFixture.salt,
                                                 byteOffset: byteOffset, geometry: geometry)
            fuzzCheck(back == root, "checkpoint round trip changed the value")
        } catch {
            fuzzFail("re-encoded checkpoint root does not decode: \(error)")
        }
        if fuzzStrict { fuzzCheck(again == bytes, "accepted checkpoint root is not canonical") }
    } catch {
        _ = error.description
    }
    return 0
}
