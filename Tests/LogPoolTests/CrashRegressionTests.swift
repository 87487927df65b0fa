import Foundation
@testable import LogPool
import LogPoolFormat
import LogPoolTesting
import Testing

/// Engine bugs the crash simulation found, each named after the first crash state id
/// that showed it (Specs/CRASHSIM.md), rebuilt here directly so the test does not depend
/// on the workload generator staying the same.
@Suite("Crash simulation regressions")
struct CrashRegressionTests {
    /// v1:1:random-512:9:misdirect:0. The slot write of a checkpoint landed on the other
    /// slot (the one holding the newest commit), so open fell back to the older slot and
    /// chained its replay into the newer epoch. The recovery commit then went to the slot
    /// the misdirect had garbled, leaving the older slot behind as stale: verify after
    /// recovery reported `superblock-stale`. Recovery now commits twice in that case.
    @Test("v1:1:random-512:9:misdirect:0: recovery after a misdirected slot write leaves both slots valid and chained")
    func misdirectedSlotWrite() throws {
        let (pool, device) = try makePool()
        var model = try populate(pool)
        try pool.checkpoint()
        try pool.openVolume(name: "v").write(at: 4096, from: pattern(8192, seed: 41))
        model.write("v", at: 4096, pattern(8192, seed: 41))
        try pool.sync()
        var image = device.durable
        let newest = try Pool.open(on: SimulatedDevice(image: image), mode: .readOnly).recoveryReport.chosenSlot
        // The next slot write (meant for the older slot) landed on the newest one: its
        // bytes carry the other slot index, so the newest slot no longer decodes.
        let older = 1 - newest
        let newestOffset = Int(PoolGeometry.superblockSlotByteOffsets[newest])
        let olderOffset = Int(PoolGeometry.superblockSlotByteOffsets[older])
        var garbled = Array(image[olderOffset..<olderOffset + PoolGeometry.superblockByteCount])
        garbled[100] ^= 0x10
        image.replaceSubrange(newestOffset..<newestOffset + PoolGeometry.superblockByteCount, with: garbled)
        let (recovered, recoveredDevice) = try reopen(device, image: image)
        try expectMatches(recovered, model)
        #expect(recovered.recoveryReport.otherSlotProblem != nil)
        let report = try Pool.verify(on: SimulatedDevice(image: recoveredDevice.currentImage))
        #expect(report.problems.isEmpty, "\(report.problems)")
    }

    /// Opens `image` read-only with its newest slot damaged (a flipped bit), so open
    /// falls back to the older slot and replays from there (J-5).
    private func openOlderSlot(_ image: [UInt8]) throws -> Pool {
        var image = image
        if let newest = WriteChecks.newestSlot(image) {
            image[Int(PoolGeometry.superblockSlotByteOffsets[newest.slotIndex]) + 100] ^= 0x10
        }
        return try Pool.open(on: SimulatedDevice(image: image), mode: .readOnly)
    }

    /// The journal half of R-4: epoch g's records stay in the ring until slot g is
    /// overwritten. Before, epoch g+1 could use the whole ring again (its checkpoint
    /// starts at 3/4 of it), wrap over epoch g's first records, and a fallback to slot g
    /// then stopped at the first overwritten record, silently dropping the rest of g
    /// and all of g+1. Epoch g here fills 60% of the ring with records that carry no
    /// data (renames), a commit closes it, and epoch g+1 goes on; after every sync the
    /// fallback must read back the synced state.
    @Test("a fallback to the older slot finds the whole of its epoch in the journal ring")
    func fallbackFindsItsJournal() throws {
        let (pool, device) = try makePool()
        var model = ReferenceModel()
        var name = "v"
        let v = try pool.createVolume(name: name, size: 64 << 10)
        model.create(name, size: 64 << 10)
        try v.write(at: 0, from: pattern(64 << 10, seed: 3))
        model.write(name, at: 0, pattern(64 << 10, seed: 3))
        try pool.checkpoint()
        func rename() throws {
            let next = name == "v" ? "w" : "v"
            try pool.rename(name, to: next)
            model.rename(name, to: next)
            name = next
        }
        var renames = 0
        while pool.stats.journalUsedBytes < pool.stats.journalBytes * 6 / 10 && renames < 100_000 {
            try rename()
            renames += 1
            if renames % 64 == 0 { try pool.sync() }
        }
        #expect(pool.stats.journalUsedBytes >= pool.stats.journalBytes * 6 / 10, "the ring did not fill")
        try pool.checkpoint()
        var checked = 0
        for step in 1...(2 * renames) {
            try rename()
            guard step % 64 == 0 else { continue }
            try pool.sync()
            let fallback = try openOlderSlot(device.durable)
            let names = try fallback.list().map(\.name)
            let ok = try names == [name] && fallback.openVolume(name: name).read(at: 0, length: 64 << 10) == model.volumes[name]?.bytes
            #expect(ok, "step \(step): the fallback to generation \(fallback.recoveryReport.generation) lost synced renames: volumes \(names), expected \(name) (replay: \(fallback.recoveryReport.replayStopReason))")
            guard ok else { return }
            checked += 1
        }
        #expect(checked > 0)
    }

    /// R-4 at open: recovery replays an epoch whose blocks died within it (a volume
    /// written and deleted in one synced batch), and its commit keeps what those records
    /// wrote until the next commit. Writes right after the recovery land elsewhere, so a
    /// fallback to the slot recovery replayed (the recovery commit damaged) still finds
    /// the data it checks. Without the keeping, the recovery commit freed the deleted
    /// volume's segments, the next write reused them, and the fallback read the batch as
    /// torn, silently losing the synced delete and overwrite.
    @Test("after a recovery, a fallback to the slot it replayed finds the data of every record it replays")
    func fallbackAfterRecovery() throws {
        let (pool, device) = try makePool()
        var model = ReferenceModel()
        let v = try pool.createVolume(name: "v", size: 512 << 10)
        model.create("v", size: 512 << 10)
        try v.write(at: 0, from: pattern(512 << 10, seed: 1))
        model.write("v", at: 0, pattern(512 << 10, seed: 1))
        try pool.checkpoint()
        let t = try pool.createVolume(name: "t", size: 256 << 10)
        try t.write(at: 0, from: pattern(256 << 10, seed: 2))
        try pool.delete(name: "t")
        try v.write(at: 8192, from: pattern(4096, seed: 3))
        model.write("v", at: 8192, pattern(4096, seed: 3))
        try pool.sync()
        // Crash here; recovery replays the batch and commits.
        let (recovered, recoveredDevice) = try reopen(device)
        #expect(recovered.recoveryReport.replayedRecordCount > 0)
        let synced = model
        let w = try recovered.openVolume(name: "v")
        for i in 0..<64 {
            let data = pattern(4096, seed: UInt8(truncatingIfNeeded: 10 + i))
            try w.write(at: UInt64(i * 8192), from: data)
            model.write("v", at: i * 8192, data)
        }
        // The writes' blocks have landed; their record is not synced yet.
        for (image, expected) in [(recoveredDevice.currentImage, synced), (recoveredDevice.durable, synced)] {
            let fallback = try openOlderSlot(image)
            let names = try fallback.list().map(\.name)
            let bytes = try fallback.openVolume(name: "v").read(at: 0, length: 512 << 10)
            #expect(names == ["v"] && bytes == expected.volumes["v"]?.bytes,
                    "the fallback to generation \(fallback.recoveryReport.generation) lost synced changes: volumes \(names) (replay: \(fallback.recoveryReport.replayStopReason))")
        }
    }

    /// The R-4 gap after a recovery (FORMAT J-8). A crash tore the second record of a
    /// batch, inside a 512-byte sector; recovery replayed the first and wrote its own
    /// epoch's records from the next sector boundary on, so the torn bytes stayed in
    /// between. Media damage to the recovery's commit then made open fall back to the
    /// slot recovery had replayed: replay stopped at the torn bytes and silently lost the
    /// write synced after the recovery. It now goes on at the next boundary when the
    /// records there are a later epoch's with the sequence expected at the stop.
    @Test("after a recovery that stopped inside a sector, a fallback to the slot it replayed finds the writes synced since")
    func fallbackChainsPastTornSector() throws {
        let (pool, device) = try makePool()
        var model = ReferenceModel()
        let v = try pool.createVolume(name: "v", size: 256 << 10)
        model.create("v", size: 256 << 10)
        try v.write(at: 0, from: pattern(64 << 10, seed: 1))
        model.write("v", at: 0, pattern(64 << 10, seed: 1))
        try pool.checkpoint()
        // One batch, two records: the second is torn by the crash.
        try v.write(at: 0, from: pattern(4096, seed: 2))
        model.write("v", at: 0, pattern(4096, seed: 2))
        try v.write(at: 8192, from: pattern(4096, seed: 3))
        try pool.sync()
        var image = device.durable
        let slot = try #require(WriteChecks.newestSlot(image))
        let first = Int(PoolGeometry.journalByteOffset + slot.journalReplayByteOffset)
        let payload = image.withUnsafeBytes { Int($0.loadLE(UInt32.self, at: first + JournalRecordLayout.payloadByteCountOffset)) }
        let second = first + JournalRecordLayout.headerByteCount + payload
        #expect(second % 512 != 0, "the second record starts inside a sector")
        image[second + JournalRecordLayout.headerByteCount + 2] ^= 0x5A
        let (recovered, recoveredDevice) = try reopen(device, image: image)
        let report = recovered.recoveryReport
        #expect(report.replayedRecordCount == 1 && report.replayStopRingOffset % 512 != 0,
                "replay applies the first record and stops inside a sector: \(report.replayStopReason)")
        try expectMatches(recovered, model)
        try recovered.openVolume(name: "v").write(at: 16384, from: pattern(4096, seed: 4))
        model.write("v", at: 16384, pattern(4096, seed: 4))
        try recovered.sync()
        // The recovery's commit is damaged: open falls back to the slot it replayed.
        let fallback = try openOlderSlot(recoveredDevice.durable)
        #expect(fallback.recoveryReport.generation == slot.generation)
        try expectMatches(fallback, model)
    }

    /// v1:7015:random-4096:132:media:6. A compaction right after a commit copied blocks
    /// into the dead extent of a block a journal record of the closed epoch had written;
    /// media damage then destroyed the newer slot. Open fell back to the older slot,
    /// replay met that record's overwritten data, took it for a torn batch and silently
    /// dropped eight synced ops. The data of the records the older slot replays now
    /// stays out of reuse until the commit after (R-4, COMMIT §5.2), and so do their
    /// journal bytes. Here a nearly full pool is overwritten at random in one epoch, a
    /// commit closes it, and the next epoch overwrites and compacts (reusing dead space);
    /// at every sync of that epoch the newest slot is damaged in a copy of the durable
    /// image, and the fallback must read back the last synced state. (A page the older
    /// checkpoint names may have been reused, short lag: that is a typed `corrupt`,
    /// counted, never silent.)
    @Test("v1:7015:random-4096:132:media:6: a fallback to the older slot replays every record with its data (seeded)",
          arguments: [1, 2, 3, 4] as [UInt64])
    func fallbackFindsRecordData(seed: UInt64) throws {
        var rng = SeededGenerator(seed: seed)
        let (pool, device) = try makePool()
        var model = ReferenceModel()
        let blocks = 768
        let v = try pool.createVolume(name: "v", size: UInt64(blocks * 4096))
        model.create("v", size: blocks * 4096)
        for i in stride(from: 0, to: blocks, by: 16) {
            let data = pattern(16 * 4096, seed: UInt8(truncatingIfNeeded: i))
            try v.write(at: UInt64(i * 4096), from: data)
            model.write("v", at: i * 4096, data)
        }
        try pool.checkpoint()
        /// The model after each write, for a crash that keeps some unsynced ones.
        var states: [ReferenceModel] = []
        func overwrite(_ count: Int) throws {
            for _ in 0..<count {
                let at = Int.random(in: 0..<(blocks - 4), using: &rng) * 4096
                let data = pattern(4096 * Int.random(in: 1...4, using: &rng), seed: UInt8.random(in: 0...255, using: &rng))
                try v.write(at: UInt64(at), from: data)
                model.write("v", at: at, data)
                states.append(model)
            }
        }
        var fellBack = 0, reported = 0
        /// `image` with its newest slot damaged must open on the older slot and read
        /// back one of `expected` (the synced state, or one with some of the writes after
        /// it whose records had landed), or report `corrupt`.
        func checkFallback(_ image: [UInt8], _ expected: [ReferenceModel], _ what: String) throws {
            guard let newest = WriteChecks.newestSlot(image) else {
                Issue.record("seed \(seed) \(what): the image has no valid slot")
                return
            }
            do {
                let fallback = try openOlderSlot(image)
                let bytes = try fallback.openVolume(name: "v").read(at: 0, length: blocks * 4096)
                let names = try fallback.list().map(\.name)
                #expect(expected.contains { bytes == $0.volumes["v"]?.bytes } && names == ["v"],
                        "seed \(seed) \(what): the fallback to generation \(fallback.recoveryReport.generation) lost synced changes (replay: \(fallback.recoveryReport.replayStopReason), \(fallback.recoveryReport.replayedRecordCount) records; newest slot: generation \(newest.generation), replay start \(newest.journalReplayByteOffset) sequence \(newest.journalReplaySequence))")
                fellBack += 1
            } catch let error as PoolError {
                // Only a page or block the older checkpoint names may have been reused
                // (short lag); the journal it replays may not.
                guard case .corrupt(let structure, _, _) = error, structure != "journal record" else { throw error }
                reported += 1
            }
        }
        for round in 0..<8 {
            // Epoch g ends with one batch whose blocks die within it (the violation's
            // write(a); ...; delete(a); sync), plus overwrites before it.
            try overwrite(40)
            try pool.sync()
            let t = try pool.createVolume(name: "t", size: 256 << 10)
            try t.write(at: 0, from: pattern(256 << 10, seed: UInt8(truncatingIfNeeded: round)))
            try pool.delete(name: "t")
            try pool.sync()
            try pool.checkpoint()
            states = [model]
            // Epoch g+1: blocks land in space that epoch g freed, before any record of
            // g+1 is synced (as the violation's compaction did when the crash came).
            try overwrite(30)
            try checkFallback(device.currentImage, states, "round \(round), unsynced writes after the commit")
            if round % 2 == 1 { _ = try pool.compact() }
            try pool.sync()
            try checkFallback(device.durable, [model], "round \(round), after a sync")
        }
        #expect(fellBack > 0, "seed \(seed): no fallback succeeded (\(reported) reported corrupt)")
    }

    /// v1:1:random-512:7:media:0 and v1:4:near-full-4096:5:misdirect:0. Media damage to a
    /// block that a synced journal record maps made replay stop there as if the batch had
    /// been torn, silently dropping every synced change after it. Open now refuses with
    /// `corrupt(journal record)` when a later record proves the stop was synced (J-7).
    @Test("v1:1:random-512:7:media:0: damage inside synced journal space fails open with corrupt(journal record)")
    func syncedJournalDamage() throws {
        // The first record of the first synced batch is damaged.
        let (intact, image) = try DamagedImages.syncedJournalDamage()
        let replay = try Pool.open(on: SimulatedDevice(image: intact), mode: .readOnly).recoveryReport
        #expect(replay.replayedRecordCount >= 2)
        expectCorrupt("journal record") { _ = try Pool.open(on: SimulatedDevice(image: image)) }
        // Verify still looks (read-only, salvaging) and names the damage.
        let report = try Pool.verify(on: SimulatedDevice(image: image))
        #expect(report.problems.contains { $0.code == "journal-synced-damage" }, "\(report.problems)")
        // A read-only open refuses too (it would serve the state before the damage as
        // if it were the pool); asking for salvage reads what precedes it and says so,
        // writing nothing.
        expectCorrupt("journal record") { _ = try Pool.open(on: SimulatedDevice(image: image), mode: .readOnly) }
        let readOnlyDevice = SimulatedDevice(image: image)
        let readOnly = try Pool.open(on: readOnlyDevice, mode: .readOnly, acceptJournalLoss: true)
        #expect(readOnly.recoveryReport.syncedJournalDamage && readOnlyDevice.writeCount == 0)
        #expect(try readOnly.list().map(\.name) == ["v"])
        // Accepting the loss opens read-write and leaves a pool that verifies clean.
        let accepting = SimulatedDevice(image: image)
        let accepted = try Pool.open(on: accepting, acceptJournalLoss: true)
        #expect(accepted.recoveryReport.syncedJournalDamage)
        try accepted.close()
        #expect(try Pool.verify(on: SimulatedDevice(image: accepting.currentImage)).problems.isEmpty)
    }

    /// v1:4:near-full-4096:5:misdirect:0. A 7 MiB fill with one sync at the end made one
    /// batch of it: damage to any block of that batch, having no later record to prove
    /// the batch synced, silently dropped everything after it. The writer now syncs on
    /// its own when a batch passes ring/8 (J-7), so the damage is proven and reported.
    @Test("v1:4:near-full-4096:5:misdirect:0: a long unsynced run is cut into bounded batches")
    func boundedBatches() throws {
        let (pool, device) = try makePool()
        let v = try pool.createVolume(name: "v", size: 6 << 20)
        try pool.checkpoint()
        let syncsBefore = device.syncCount
        for i in 0..<160 {
            try v.write(at: UInt64(i) * 32768, from: pattern(32768, seed: UInt8(i % 251)))
        }
        #expect(device.syncCount > syncsBefore + 1, "no internal sync in a 5 MiB unsynced run")
        try pool.sync()
        // Damage the first written block: a later batch proves its batch was synced, so
        // the damage is reported (at open or on read), never silently dropped.
        var image = device.durable
        let first = try firstRecordOffset(image)
        image[first + JournalRecordLayout.headerByteCount + 5] ^= 0x01
        expectCorrupt("journal record") { _ = try Pool.open(on: SimulatedDevice(image: image)) }
    }

    /// Goal (COMMIT §3 triggers): what a crash leaves to replay is bounded by a record
    /// count, not only by the ring's bytes (a 64 MiB ring of 4 KiB writes held about
    /// 400,000 records, 1.7 s of replay). With the bound lowered to 50, 400 small writes
    /// that fill a tenth of the ring leave at most 50 records to replay, and every synced
    /// write is there after the crash. Fails with the record trigger removed (all 400
    /// replay).
    @Test("a checkpoint starts every replayRecordBound records, so replay after a crash stays bounded")
    func replayRecordBound() throws {
        let (pool, device) = try makePool()
        pool.engine.replayRecordBound = 50
        let v = try pool.createVolume(name: "v", size: 1 << 20)
        var model = [UInt8](repeating: 0, count: 1 << 20)
        let generation = pool.stats.generation
        for i in 0..<400 {
            let data = pattern(4096, seed: UInt8(truncatingIfNeeded: i))
            let at = (i * 7 % 256) * 4096
            try v.write(at: UInt64(at), from: data)
            model.replaceSubrange(at..<at + 4096, with: data)
        }
        try pool.sync()
        #expect(pool.stats.generation >= generation + 7, "generation \(pool.stats.generation), from \(generation)")
        let (recovered, _) = try reopen(device, image: device.durable)
        #expect(recovered.recoveryReport.replayedRecordCount <= 50, "\(recovered.recoveryReport)")
        #expect(try recovered.openVolume(name: "v").read(at: 0, length: 1 << 20) == model)
        #expect(recovered.internalConsistencyProblems() == [])
    }

    /// v1:2:random-4096:7:media:2. An unreadable segment header sector made verify
    /// throw an I/O error instead of reporting it; it is now an `unreadable` warning and
    /// the rest of the check goes on.
    @Test("v1:2:random-4096:7:media:2: verify reports an unreadable sector instead of throwing")
    func unreadableSector() throws {
        let (pool, device) = try makePool()
        _ = try populate(pool)
        try pool.sync()
        let overlay = OverlayDevice(base: device.durable)
        let dataStart = Int(try #require(WriteChecks.newestSlot(device.durable)).geometry.dataAreaByteOffset)
        overlay.unreadableSectors = [dataStart / 512]
        let damaged = try Pool.verify(on: overlay, scrubData: true)
        #expect(damaged.problems.contains { $0.code == "unreadable" && $0.severity == .warning }, "\(damaged.problems)")
        #expect(!damaged.problems.contains { $0.severity == .error }, "\(damaged.problems)")
    }

    /// v1:7:random-4096:63:prefix:52 (found by the first --long run, shrunk from 192 ops
    /// to these 17). The engine syncs on its own after a record once a batch passes its
    /// bound (J-7), so a crash at that sync may keep the whole op in progress. The
    /// simulator only accepted states of finished ops; it now also accepts the state
    /// the op in progress leaves (invariant 2: p ≤ the last op issued).
    @Test("v1:7:random-4096:63:prefix:52: a crash at a sync an op makes on its own may keep that op")
    func syncInsideAnOp() throws {
        func data(_ n: Int, _ s: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ s &* 13 &+ ($0 >> 9)) } }
        let ops: [Op] = [
            .resize("b", 81920), .write("b", 0, data(65536, 1)), .write("b", 3859, data(65536, 2)), .write("b", 12288, data(65536, 3)),
            .write("a", 13064, data(12288, 4)), .resize("a", 94208), .write("a", 26836, data(100, 5)), .write("a", 16266, data(65536, 6)),
            .write("b", 20480, data(1, 7)), .write("b", 4096, data(65536, 8)), .write("b", 51046, data(5000, 9)), .write("b", 8192, data(65536, 10)),
            .write("a", 77824, data(5000, 11)), .write("b", 53248, data(100, 12)), .discard("a", 31553, 21838), .write("b", 6229, data(65536, 13)),
            .write("a", 49152, data(100, 14)),
        ]
        let simulator = try CrashWorkloads.explicit(ops, seed: 7, physicalSectorByteCount: 4096)
        #expect(simulator.figures.violations.isEmpty, "\(simulator.figures.violations)")
        #expect(simulator.figures.crashPoints >= 1 && simulator.figures.uniqueTotal > 20, "the ops no longer reach an internal sync")
    }

    /// v1:2:random-512:126:media:7 (first --long run). An unreadable sector in the
    /// journal ring ahead of the records made replay's 64 KiB read window fail, so open
    /// (and verify) failed with an I/O error although every record it needed was
    /// readable. Replay now reads just the record when a window fails, an unreadable
    /// record ends replay like a damaged one (J-7 decides torn tail or corrupt), and the
    /// synced-damage scan steps around unreadable sectors.
    @Test("v1:2:random-512:126:media:7: an unreadable journal sector ahead of the records does not stop recovery")
    func unreadableJournalSector() throws {
        let (pool, device) = try makePool()
        var model = try populate(pool)
        try pool.checkpoint()
        try pool.openVolume(name: "v").write(at: 0, from: pattern(4096, seed: 5))
        model.write("v", at: 0, pattern(4096, seed: 5))
        try pool.sync()
        let start = try firstRecordOffset(device.durable)
        // A sector 20 KiB past the records: inside the 64 KiB window, needed by nothing.
        let ahead = OverlayDevice(base: device.durable)
        ahead.unreadableSectors = [(start + 20 * 1024) / 512]
        let recovered = try Pool.open(on: ahead)
        try expectMatches(recovered, model)
        let report = try Pool.verify(on: ahead.fork(), scrubData: true)
        #expect(report.isClean, "\(report.problems)")
        // The record itself unreadable: replay stops before it (the newest batch: a
        // torn tail), reported as unreadable, never an I/O error out of open.
        let onRecord = OverlayDevice(base: device.durable)
        onRecord.unreadableSectors = [start / 512]
        let stopped = try Pool.open(on: onRecord, mode: .readOnly)
        #expect(stopped.recoveryReport.replayStopKind == .unreadable, "\(stopped.recoveryReport.replayStopReason)")
    }

}

/// The ring offset (in the file) of the first journal record after the chosen slot's
/// replay start.
func firstRecordOffset(_ image: [UInt8]) throws -> Int {
    Int(PoolGeometry.journalByteOffset + (try #require(WriteChecks.newestSlot(image))).journalReplayByteOffset)
}

/// The write-time checks must be able to fail: writes that break each rule, made
/// directly on the device under a live pool.
@Suite("Write-time checks")
struct WriteChecksTests {
    func put(_ device: SimulatedDevice, _ bytes: [UInt8], at offset: some BinaryInteger) throws {
        try bytes.withUnsafeBytes { try device.write($0, at: UInt64(offset)) }
    }

    func setUp() throws -> (Pool, SimulatedDevice, WriteChecks, () -> [String]) {
        let (pool, device) = try makePool()
        _ = try populate(pool)
        try pool.checkpoint()
        try pool.openVolume(name: "v").write(at: 8192, from: pattern(8192, seed: 3))
        try pool.sync()
        let checks = WriteChecks(physicalSectorByteCount: 512)
        var found: [String] = []
        checks.onViolation = { check, _ in found.append(check) }
        checks.attach(to: device)
        return (pool, device, checks, { found })
    }

    @Test("W1/W2: writing over referenced pages, blocks or synced journal is caught at the write")
    func overwriteDurable() throws {
        let (_, device, _, found) = try setUp()
        let extents = try Pool.referencedExtents(on: OverlayDevice(base: device.durable))
        let page = try #require(extents.first { $0.structure == "page" })
        let block = try #require(extents.first { $0.structure == "block" })
        let journal = try #require(extents.first { $0.structure == "journal" })
        try put(device, [UInt8](repeating: 0xAB, count: 4096), at: page.byteOffset)
        #expect(found() == ["overwrite-durable"])
        try put(device, [UInt8](repeating: 0xAB, count: 100), at: block.byteOffset + 10)
        #expect(found().last == "rewrite-synced-sector")
        try put(device, [UInt8](repeating: 0, count: 512), at: journal.byteOffset)
        #expect(found().count == 3 && found().last == "rewrite-synced-sector")
    }

    @Test("W3/W4: a slot written over the chosen one, out of order, or unchained is caught")
    func slotDiscipline() throws {
        let (pool, device, _, found) = try setUp()
        let chosen = pool.recoveryReport.chosenSlot
        _ = chosen
        let image = device.durable
        // The newest slot (after populate's checkpoints), rewritten in place: W4.
        let slots = PoolGeometry.superblockSlotByteOffsets.map { Int($0) }
        let newest = try (0..<2).max { a, b in
            try Superblock.decode(Array(image[slots[a]..<slots[a] + 512]), slotIndex: a).generation
                < Superblock.decode(Array(image[slots[b]..<slots[b] + 512]), slotIndex: b).generation
        }!
        try put(device, Array(image[slots[newest]..<slots[newest] + 512]), at: UInt64(slots[newest]))
        #expect(found() == ["slot"])
        // A pending write, then a slot write: W3.
        try put(device, [UInt8](repeating: 1, count: 512), at: UInt64(device.durable.count - 512))
        var other = try Superblock.decode(Array(image[slots[1 - newest]..<slots[1 - newest] + 512]), slotIndex: 1 - newest)
        other.generation += 2
        try put(device, other.encode(), at: UInt64(slots[1 - newest]))
        #expect(found().contains("pointer-before-pointee"))
        // That slot's parent is not the chosen slot's checksum: W4 again.
        #expect(found().filter { $0 == "slot" }.count == 2, "\(found())")
    }
}
