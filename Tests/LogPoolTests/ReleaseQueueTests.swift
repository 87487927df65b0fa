@testable import LogPool
import LogPoolFormat
import LogPoolTesting
import Testing

/// Deletes in bounded steps (Specs/COMMIT.md §5.4, FORMAT C-11): a delete queues the map
/// and touches no page or count; release steps give the blocks back after writes, when
/// admission needs room, and all at once in `compact()`; a crash at any point between
/// steps recovers a state whose counts match every map, queued ones included.
@Suite("Release queue")
struct ReleaseQueueTests {
    /// A pool with volume `v` of `blocks` 512-byte blocks written (many leaves for little
    /// data: 509 blocks per map leaf).
    func filled(blocks: Int) throws -> (Pool, SimulatedDevice) {
        let (pool, device) = try makePool(capacity: 48 << 20, blockSize: 512)
        let v = try pool.createVolume(name: "v", size: UInt64(blocks) * 512)
        try v.write(at: 0, from: pattern(blocks * 512, seed: 3))
        try pool.sync()
        return (pool, device)
    }

    @Test("a delete queues the map without touching it; steps after later writes release it; verify is clean at every point")
    func deleteInSteps() throws {
        let blocks = 509 * 100  // 100 map leaves: more than the steps one delete runs
        let (pool, device) = try filled(blocks: blocks)
        let w = try pool.createVolume(name: "w", size: 1 << 20)
        let liveBefore = pool.engine.liveBlockCount
        let changedBefore = pool.engine.ids.changedLeafCount
        let steps = Engine.releaseStepsBetweenChanges
        try pool.delete(name: "v")
        #expect(pool.stats.deletedMapsReleasing == 1, "100 leaves take more than \(steps) steps of \(Engine.leavesPerReleaseStep)")
        let released = liveBefore - pool.engine.liveBlockCount
        #expect(released > 0 && released <= steps * Engine.leavesPerReleaseStep * 509,
                "the delete's own steps released \(released) blocks, at most \(steps) steps' worth")
        #expect(pool.engine.ids.changedLeafCount - changedBefore <= released / 1018 + 2 * steps + 2)
        #expect(pool.internalConsistencyProblems() == [])
        #expect(throws: PoolError.self) { try pool.openVolume(name: "v") }
        try pool.createVolume(name: "v", size: 4096)  // the name is free at once

        // The queue is durable: a clean reopen and a crash both keep it, and verify
        // counts its blocks as referenced.
        try pool.sync()
        let crashed = SimulatedDevice(image: device.currentImage)
        let report = try Pool.verify(on: SimulatedDevice(image: device.currentImage))
        #expect(report.problems.filter { $0.severity == .error } == [], "\(report.problems)")
        let recovered = try Pool.open(on: crashed)
        #expect(recovered.stats.deletedMapsReleasing == 1)
        #expect(recovered.internalConsistencyProblems() == [])

        // Writes release more; compact releases the rest.
        var writes = 0
        while recovered.stats.deletedMapsReleasing == 1 && writes < 3 {
            try recovered.openVolume(name: "w").write(at: UInt64(writes) * 4096, from: pattern(4096, seed: 9))
            writes += 1
        }
        #expect(recovered.engine.liveBlockCount < liveBefore - released, "writes ran release steps")
        _ = try recovered.compact()
        #expect(recovered.stats.deletedMapsReleasing == 0)
        #expect(recovered.internalConsistencyProblems() == [])
        #expect(recovered.engine.liveBlockCount <= writes * 8, "only w's blocks are left (v was recreated empty)")
        try recovered.close()
        let after = try Pool.verify(on: crashed)
        #expect(after.problems.isEmpty, "\(after.problems)")
    }

    @Test("deleting a snapshot that shares its whole map is one step; deleting the volume leaves the snapshot intact")
    func sharedMaps() throws {
        let (pool, _) = try filled(blocks: 509 * 40)
        try pool.snapshot(source: "v", name: "s")
        let live = pool.engine.liveBlockCount
        try pool.delete(name: "s")
        #expect(pool.stats.deletedMapsReleasing == 0, "a shared root loses one parent in one step")
        #expect(pool.engine.liveBlockCount == live)
        try pool.snapshot(source: "v", name: "s2")
        try pool.openVolume(name: "v").write(at: 0, from: pattern(4096, seed: 5))
        try pool.delete(name: "v")
        _ = try pool.compact()
        #expect(pool.stats.deletedMapsReleasing == 0)
        #expect(try pool.openVolume(name: "s2").read(at: 0, length: 509 * 40 * 512) == pattern(509 * 40 * 512, seed: 3))
        #expect(pool.engine.liveBlockCount == live, "the snapshot keeps every block; the 8 new ones are gone")
        #expect(pool.internalConsistencyProblems() == [])
    }

    @Test("a full pool takes a large write once admission has released a deleted volume's blocks")
    func admissionDrains() throws {
        // 512-byte blocks: the volume has far more leaves than the delete's own steps release.
        let (pool, _) = try makePool(capacity: 40 << 20, blockSize: 512)
        let v = try pool.createVolume(name: "v", size: 36 << 20)
        var written = 0
        do {
            while written < 36 << 20 {
                try v.write(at: UInt64(written), from: pattern(256 << 10, seed: UInt8(written >> 18 & 0x7F)))
                written += 256 << 10
            }
        } catch PoolError.poolFull {}
        #expect(written >= 24 << 20, "filled \(written) bytes")
        let w = try pool.createVolume(name: "w", size: 36 << 20)
        #expect(throws: PoolError.self, "full before the delete") { try w.write(at: 0, from: pattern(written, seed: 1)) }
        try pool.delete(name: "v")
        #expect(pool.stats.deletedMapsReleasing == 1, "the delete's own steps release only part of it")
        // One call of many atomic units: admitted whole (admitWholeWrite, which counts
        // every block new), after the queue gave its blocks back.
        let again = written / 4 * 3 / 4096 * 4096
        try w.write(at: 0, from: pattern(again, seed: 1))
        #expect(pool.stats.deletedMapsReleasing == 0)
        #expect(try w.read(at: 0, length: again) == pattern(again, seed: 1))
        #expect(pool.internalConsistencyProblems() == [])
    }

    @Test("release records that do not fit the queue are corrupt, not a double release")
    func badRecords() throws {
        let (pool, _) = try filled(blocks: 509 * 40)
        try pool.delete(name: "v")
        let engine = pool.engine
        try #require(engine.releaseQueue.count <= 1)
        let id = engine.volumeIDsByName["v"] ?? 1
        expectCorrupt(structure: "journal record", detailContains: "does not exist") {
            try engine.apply(.releaseQueued(id: id + 100, upTo: 1))
        }
        if let queued = engine.releaseQueue.first {
            expectCorrupt(structure: "journal record", detailContains: "is not above") {
                try engine.apply(.releaseQueued(id: queued.id, upTo: queued.releasedSlotCount))
            }
            expectCorrupt(structure: "journal record", detailContains: "is not above") {
                try engine.apply(.releaseQueued(id: queued.id, upTo: queued.map.capacity + 1))
            }
        }
        #expect(pool.internalConsistencyProblems() == [])
    }
}
