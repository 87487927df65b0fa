@testable import LogPool
import LogPoolTesting
import Testing
import Foundation

@Suite("Pool full", .strictVerify)
struct PoolFullTests {
    @Test("filling a pool ends in poolFull with nothing changed; deleting a snapshot frees space")
    func fillThenDelete() throws {
        let (pool, device) = try makePool(capacity: 8 << 20)
        let v = try pool.createVolume(name: "v", size: 64 << 20)
        var model = ReferenceModel()
        model.create("v", size: 64 << 20)
        try v.write(at: 0, from: pattern(512 * 1024, seed: 1))
        model.write("v", at: 0, pattern(512 * 1024, seed: 1))
        try pool.snapshot(source: "v", name: "s")
        model.branch("v", "s", snapshot: true)
        var offset = 512 * 1024
        var full = false
        var chunk = 0
        while !full {
            let data = pattern(64 * 1024, seed: UInt8(truncatingIfNeeded: chunk))
            do {
                try v.write(at: UInt64(offset), from: data)
                model.write("v", at: offset, data)
                offset += data.count
                chunk += 1
            } catch PoolError.poolFull {
                full = true
            }
            #expect(offset < 64 << 20, "never reported poolFull")
        }
        #expect(offset > 4 << 20, "an 8 MiB pool held only \(offset) bytes")
        try expectMatches(pool, model)
        // The failed write changed nothing, in memory and on disk after recovery.
        try pool.sync()
        let (recovered, _) = try reopen(device, image: device.durable)
        try expectMatches(recovered, model)
        // Overwrite of the snapshot-shared region needs new space: still full.
        expectPoolError({ if case .poolFull = $0 { true } else { false } }) {
            try v.write(at: 0, from: pattern(256 * 1024, seed: 99))
        }
        try expectMatches(pool, model)
        // Delete the snapshot: always works and gives space back.
        try pool.delete(name: "s")
        model.delete("s")
        try v.write(at: 0, from: pattern(256 * 1024, seed: 99))
        model.write("v", at: 0, pattern(256 * 1024, seed: 99))
        try expectMatches(pool, model)
    }

    /// Goal: on a full pool a discard of data the volume owns alone is admitted (it adds
    /// nothing), so space can be given back; so is a discard of never-written space.
    /// Found by the crash simulation's near-full workload, where every discard on the
    /// full pool failed with `poolFull` because admission counted every page on its paths
    /// as new.
    @Test("a discard on a full pool succeeds when the volume owns its pages")
    func discardOnFullPool() throws {
        let (pool, _) = try makePool(capacity: 8 << 20)
        let v = try pool.createVolume(name: "v", size: 64 << 20)
        var model = ReferenceModel()
        model.create("v", size: 64 << 20)
        var offset = 0
        while true {
            let data = pattern(64 * 1024, seed: UInt8(truncatingIfNeeded: offset >> 16))
            do {
                try v.write(at: UInt64(offset), from: data)
            } catch PoolError.poolFull {
                break
            }
            model.write("v", at: offset, data)
            offset += data.count
        }
        try v.discard(at: 65536, length: 8192)
        model.discard("v", at: 65536, length: 8192)
        try v.discard(at: UInt64(offset) + (1 << 20), length: 1 << 20)
        try v.discard(at: 4096 + 100, length: 5000)  // partial blocks: rewritten edges
        model.discard("v", at: 4096 + 100, length: 5000)
        try expectMatches(pool, model)
    }

    /// Goal: a pool filled with live data to `poolFull` still accepts overwrites of blocks
    /// a volume owns alone, indefinitely. Method: fill, then overwrite random blocks many
    /// times the pool's free headroom, checking the model at the end and the invariants
    /// along the way.
    @Test("overwriting owned data keeps working on a pool full of live data", arguments: [UInt64(42), 7])
    func overwriteOnFullPool(seed: UInt64) throws {
        let (pool, _) = try makePool(capacity: 32 << 20, segmentSize: nil)
        let v = try pool.createVolume(name: "v", size: 64 << 20)
        var model = try fillUntilPoolFull(v, chunkByteCount: 32 * 1024)
        let written = model.count
        #expect(written > 4 << 20)
        // Overwrite every owned block many times over: the compactor must keep up.
        var generator = SeededGenerator(seed: seed)
        for round in 0..<(ProcessInfo.processInfo.environment["LOGPOOL_LONG"] == nil ? 4000 : 40000) {
            let block = Int.random(in: 0..<(written / 4096), using: &generator)
            let data = pattern(4096, seed: UInt8(truncatingIfNeeded: round))
            do {
                try v.write(at: UInt64(block * 4096), from: data)
            } catch {
                Issue.record("seed \(seed) round \(round): \(error)")
                return
            }
            model.replaceSubrange(block * 4096..<(block + 1) * 4096, with: data)
            if round % 1000 == 0 {
                #expect(pool.internalConsistencyProblems() == [], "seed \(seed) round \(round)")
            }
        }
        #expect(try v.read(at: 0, length: written) == model)
        #expect(pool.stats.usedBytes >= UInt64(written))
    }

    @Test("a 64 MiB pool holds at least 40 MiB of user data")
    func smallPoolCapacity() throws {
        let device = SimulatedDevice(byteCount: 64 << 20)
        let pool = try Pool.create(on: device, capacity: 64 << 20, compression: .none)
        let v = try pool.createVolume(name: "v", size: 1 << 30)
        var written = 0
        let chunk = pattern(1 << 20, seed: 3)
        do {
            while true {
                try v.write(at: UInt64(written), from: chunk)
                written += chunk.count
            }
        } catch PoolError.poolFull {}
        #expect(written >= 40 << 20, "only \(written >> 20) MiB fit")
    }
}

@Suite("Space edge cases from review", .strictVerify)
struct SpaceEdgeCaseTests {
    /// Goal: a compaction moving thousands of blocks (relocate records exceeding the
    /// 256 KiB ring across its batches) keeps every block. Method: 512-byte blocks, half
    /// of them overwritten, `compact`, then contents, invariants and reopen. (It does not
    /// pin down a checkpoint *inside* one batch; that case is safe by construction, see
    /// Specs/COMMIT.md §6.)
    @Test("compaction with more moves than the journal ring holds keeps every block")
    func compactionUnderJournalPressure() throws {
        let (pool, device) = try makePool(capacity: 32 << 20, blockSize: 512, segmentSize: 256 << 10)
        let v = try pool.createVolume(name: "v", size: 8 << 20)
        var model = pattern(7 << 20, seed: 3)
        try v.write(at: 0, from: model)
        // Overwrite every other 512-byte block so most segments are half dead.
        for block in stride(from: 0, to: (7 << 20) / 512, by: 2) {
            let data = [UInt8](repeating: UInt8(truncatingIfNeeded: block), count: 512)
            try v.write(at: UInt64(block * 512), from: data)
            model.replaceSubrange(block * 512..<(block + 1) * 512, with: data)
        }
        let report = try pool.compact()
        #expect(report.blocksMoved > 6500, "moved only \(report.blocksMoved)")
        #expect(try v.read(at: 0, length: model.count) == model)
        #expect(pool.internalConsistencyProblems() == [])
        try pool.close()
        let (reopened, _) = try reopen(device)
        #expect(try reopened.openVolume(name: "v").read(at: 0, length: model.count) == model)
    }

    /// Regression (review finding 2): a crash on a nearly full pool with many dirty pages
    /// must still recover read-write (the recovery checkpoint uses the dead extents).
    @Test("a crash on a nearly full pool recovers read-write", arguments: [UInt64(21), 22])
    func recoverNearlyFull(seed: UInt64) throws {
        let (pool, device) = try makePool(capacity: 8 << 20)
        let v = try pool.createVolume(name: "v", size: 64 << 20)
        var model = try fillUntilPoolFull(v, chunkByteCount: 16 * 1024)
        let written = model.count
        var generator = SeededGenerator(seed: seed)
        for round in 0..<300 {
            let block = Int.random(in: 0..<(written / 4096), using: &generator)
            let data = pattern(4096, seed: UInt8(truncatingIfNeeded: round + 1))
            try v.write(at: UInt64(block * 4096), from: data)
            model.replaceSubrange(block * 4096..<(block + 1) * 4096, with: data)
            if round % 10 == 9 { try pool.sync() }
        }
        try pool.sync()
        let (recovered, device2) = try reopen(device, image: device.durable)
        #expect(try recovered.openVolume(name: "v").read(at: 0, length: written) == model, "seed \(seed)")
        #expect(recovered.internalConsistencyProblems() == [])
        // And it keeps working: more overwrites, then a clean reopen.
        try recovered.openVolume(name: "v").write(at: 0, from: pattern(4096, seed: 99))
        model.replaceSubrange(0..<4096, with: pattern(4096, seed: 99))
        try recovered.close()
        let (again, _) = try reopen(device2)
        #expect(try again.openVolume(name: "v").read(at: 0, length: written) == model)
    }

    /// Goal (COMMIT §4 step 6): a crashed open takes the stored usage and leaves holes to
    /// admission, so its recovery checkpoint has only the free segments and the open
    /// segment's tail; when the pages replay dirtied do not fit there (the live engine
    /// had placed them in holes, its free segments down to the reserve), open rebuilds
    /// usage and holes from the table's leaves in a second pass and recovers instead of
    /// failing. Fails with the second pass removed (the recovery checkpoint runs out of
    /// space).
    @Test("a crash whose recovery checkpoint needs the holes rebuilds them and recovers", arguments: [UInt64(41), 42])
    func recoveryNeedsHoles(seed: UInt64) throws {
        let (pool, device) = try makePool(capacity: 16 << 20, blockSize: 512)
        let v = try pool.createVolume(name: "v", size: 64 << 20)
        var model = try fillUntilPoolFull(v, chunkByteCount: 64 * 1024)
        let blocks = model.count / 512
        var generator = SeededGenerator(seed: seed)
        let reserve = Int(pool.engine.geometry.reserveSegmentCount)
        let pagesPerSegment = Int(pool.engine.geometry.segmentPayloadByteCount) / PoolGeometry.pageByteCount
        var reached = false
        for round in 0..<20_000 {
            let block = Int.random(in: 0..<blocks, using: &generator)
            let data = pattern(512, seed: UInt8(truncatingIfNeeded: round + 3))
            try v.write(at: UInt64(block * 512), from: data)
            model.replaceSubrange(block * 512..<(block + 1) * 512, with: data)
            if round % 32 == 31 { try pool.sync() }
            if pool.engine.freeSegments.count <= reserve && pool.engine.dirtyPageCount > (reserve + 1) * pagesPerSegment {
                reached = true
                break
            }
        }
        try #require(reached, "seed \(seed): the free segments never ran down to the reserve with that many pages dirty")
        try pool.sync()
        let (recovered, device2) = try reopen(device, image: device.durable)
        #expect(recovered.recoveryReport.rebuiltUsageForRoom && recovered.recoveryReport.findings.isEmpty,
                "seed \(seed): \(recovered.recoveryReport)")
        #expect(try recovered.openVolume(name: "v").read(at: 0, length: model.count) == model, "seed \(seed)")
        #expect(recovered.internalConsistencyProblems() == [])
        try recovered.close()
        let report = try Pool.verify(on: SimulatedDevice(image: device2.currentImage))
        #expect(report.problems.isEmpty, "seed \(seed): \(report.problems)")
    }

    @Test("a volume table that would outgrow one segment is refused, not trapped on")
    func volumeTableBound() throws {
        let (pool, _) = try makePool(capacity: 4 << 20, segmentSize: 64 << 10)
        try pool.createVolume(name: "v", size: 4096)
        var created = 0
        do {
            while created < 5000 {
                try pool.snapshot(source: "v", name: String(repeating: "s", count: 200) + "\(created)")
                created += 1
            }
            Issue.record("5000 snapshots with long names fit a 64 KiB segment's root")
        } catch PoolError.invalidArgument(let message) {
            #expect(message.contains("volume table"))
        }
        #expect(created > 50)
        try pool.checkpoint()
        #expect(pool.internalConsistencyProblems() == [])
    }
}
