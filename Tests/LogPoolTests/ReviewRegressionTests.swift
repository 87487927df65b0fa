@testable import LogPool
import LogPoolFormat
import LogPoolTesting
import Testing

@Suite("Inputs that must be errors, not traps")
struct InputRegressionTests {
    /// Goal: a journal record that passes its checksum but carries absurd fields (as a
    /// forged or damaged file can) is `corrupt(journal record)`, never a trap. Method:
    /// feed such intents straight to `apply`, the code replay runs.
    @Test("crafted intents are corrupt(journal record)")
    func craftedIntents() throws {
        let (pool, _) = try makePool()
        try pool.createVolume(name: "v", size: 16 * 4096)
        let engine = pool.engine
        let id = engine.volumeIDsByName["v"]!
        let location = BlockLocation(byteOffset: engine.geometry.dataAreaByteOffset + 4096, storedByteCount: 4096, flags: 0, checksum: 1)
        let intents: [JournalIntent] = [
            .createVolume(id: engine.nextVolumeID, name: String(repeating: "n", count: 60_000), sizeByteCount: 4096, createdTime: 0),
            .createVolume(id: engine.nextVolumeID, name: "bad\nname", sizeByteCount: 4096, createdTime: 0),
            .createVolume(id: UInt64.max, name: "x", sizeByteCount: 4096, createdTime: 0),
            .createVolume(id: engine.nextVolumeID, name: "odd", sizeByteCount: 4097, createdTime: 0),
            .branch(id: engine.nextVolumeID, sourceID: 999, kind: .snapshot, name: "s", createdTime: 0),
            .rename(id: id, name: ""),
            .resize(id: id, sizeByteCount: UInt64.max - 4095),
            .delete(id: 12345),
            .map(volumeID: id, unmapRanges: [0..<UInt64.max], mappings: []),
            .map(volumeID: id, unmapRanges: [], mappings: [BlockMapping(blockIndex: 1 << 40, blockID: 1, location: location)]),
            .map(volumeID: id, unmapRanges: [], mappings: [BlockMapping(blockIndex: 0, blockID: UInt64.max, location: location)]),
            .map(volumeID: id, unmapRanges: [], mappings: [BlockMapping(blockIndex: 0, blockID: 1, location: BlockLocation(byteOffset: UInt64.max - 10, storedByteCount: 4096, flags: 0, checksum: 0))]),
            .mapRun(volumeID: id, firstBlockIndex: UInt64.max - 1, firstBlockID: 1, firstByteOffset: location.byteOffset, storedByteCount: 4096, checksums: [1, 2, 3]),
            .mapRun(volumeID: id, firstBlockIndex: 0, firstBlockID: UInt64.max, firstByteOffset: location.byteOffset, storedByteCount: 4096, checksums: [1, 2]),
            .relocate([BlockRelocation(blockID: 77, location: location)]),
        ]
        for intent in intents {
            expectPoolError({ error in
                if case .corrupt(let structure, _, _) = error { return structure == "journal record" }
                return false
            }, "\(intent.kindCode)") { try engine.apply(intent) }
        }
        #expect(pool.internalConsistencyProblems() == [])
    }

    @Test("a handle to a deleted volume throws notFound; huge reads are outOfRange")
    func handles() throws {
        let (pool, _) = try makePool()
        let v = try pool.createVolume(name: "v", size: 8 * 4096)
        try pool.rename("v", to: "w")
        try v.write(at: 0, from: [1, 2, 3])
        #expect(v.name == "w")
        expectPoolError({ if case .outOfRange = $0 { true } else { false } }) { _ = try v.read(at: 0, length: Int.max) }
        expectPoolError({ if case .outOfRange = $0 { true } else { false } }) { _ = try v.read(at: UInt64.max, length: 1) }
        try pool.delete(name: "w")
        expectPoolError({ if case .notFound = $0 { true } else { false } }) { _ = try v.read(at: 0, length: 1) }
        expectPoolError({ if case .notFound = $0 { true } else { false } }) { try v.write(at: 0, from: [1]) }
        try pool.close()
        expectPoolError({ $0 == .closed }) { _ = try pool.list() }
    }

    @Test("a write of several MiB that does not fit is refused whole, with nothing changed")
    func multiUnitPoolFull() throws {
        let (pool, _) = try makePool(capacity: 8 << 20)
        let v = try pool.createVolume(name: "v", size: 64 << 20)
        let before = pool.stats
        expectPoolError({ if case .poolFull = $0 { true } else { false } }) {
            try v.write(at: 0, from: pattern(12 << 20, seed: 4))
        }
        #expect(try v.info().allocatedBytes == 0)
        #expect(pool.stats.usedBytes == before.usedBytes)
    }

    @Test("creating on a device smaller than the capacity is invalidArgument")
    func smallDevice() {
        expectPoolError({ if case .invalidArgument = $0 { true } else { false } }) {
            _ = try Pool.create(on: SimulatedDevice(byteCount: 4 << 20), capacity: 8 << 20)
        }
    }
}
