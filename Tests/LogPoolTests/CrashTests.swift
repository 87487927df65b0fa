import Foundation
import LogPool
import LogPoolTesting
import Testing

@Suite("Crash consistency")
struct CrashTests {
    /// Goal: promises 1 and 2 under crashes at every sync the engine issues. Method: a
    /// seeded random workload on the 8 MiB test geometry; at each sync, every crash image
    /// of classes C0–C4 is recovered and compared with the model's states since the last
    /// durable one. The seed is in every failure message.
    @Test("every crash image recovers to a prefix that includes every synced op", arguments: [UInt64(1), 2, 3, 4])
    func enumerate(seed: UInt64) throws {
        try runEnumeration(seed: seed, physicalSectorByteCount: nil)
    }

    /// The same workloads on a device with 4 KiB physical sectors: a write that tears
    /// garbles the whole physical sectors it touches only partly. Catches anything
    /// written after a sync that shares a 4 KiB sector with what the sync made durable.
    @Test("crash images of a 4 KiB-sector device recover to a valid prefix", arguments: [UInt64(5), 6])
    func enumerate4K(seed: UInt64) throws {
        try runEnumeration(seed: seed, physicalSectorByteCount: 4096)
    }

    /// Goal: C8/C9. A failed write or fsync surfaces as `io`, the handle fails stop, and
    /// the durable image reopens to a state from the last durable op on, verify clean.
    @Test("a failed write or fsync at any of several points fails stop and recovers", arguments: [UInt64(7), 8])
    func ioFaults(seed: UInt64) throws {
        var fired = 0
        for k in [1, 2, 5, 13, 40, 90] {
            for fault in [CrashWorkloads.Fault.writeError, .fsyncError] {
                let outcome = try CrashWorkloads.fault(fault, at: fault == .fsyncError ? max(1, k / 4) : k, seed: seed, opCount: 60)
                if outcome.fired { fired += 1 }
                #expect(outcome.violations.isEmpty, "seed \(seed) \(fault) at \(k): \(outcome.violations)")
            }
        }
        #expect(fired >= 8, "only \(fired) faults fired")
    }

    func runEnumeration(seed: UInt64, physicalSectorByteCount: Int?) throws {
        let opCount = ProcessInfo.processInfo.environment["LOGPOOL_LONG"] == nil ? 60 : 600
        let simulator = try CrashWorkloads.random(seed: seed, opCount: opCount, physicalSectorByteCount: physicalSectorByteCount ?? 512)
        let figures = simulator.figures
        print("crash enumeration seed \(seed) (sector \(physicalSectorByteCount ?? 512)): \(opCount) ops, \(figures.crashPoints) crash points, \(figures.generatedTotal) states, \(figures.uniqueTotal) unique, \(figures.violationCounts) violations")
        #expect(figures.violations.isEmpty, "\(figures.violations.map(\.description).joined(separator: "\n"))")
        #expect(figures.uniqueTotal > 100, "only \(figures.uniqueTotal) unique crash states checked")
    }
}

@Suite("Crash consistency near full")
struct CrashNearFullTests {
    /// Goal: crash safety where space reuse happens: holes, compaction and
    /// checkpoints forced by admission. Method: fill an 8 MiB pool to poolFull, then
    /// seeded overwrites, discards, snapshot deletes, syncs and compactions, enumerating
    /// crash images (C0-C4) at every sync the engine issues.
    @Test("crash images on a nearly full pool recover to a valid prefix", arguments: [(UInt64(31), 512), (33, 512), (34, 4096)])
    func nearFull(seed: UInt64, sector: Int) throws {
        let device = SimulatedDevice(byteCount: 8 << 20)
        let pool = try Pool.create(on: device, capacity: 8 << 20, blockSize: 4096, segmentSize: 64 << 10, compression: .none)
        var model = ReferenceModel()
        try pool.createVolume(name: "v", size: 7 << 20)
        model.create("v", size: 7 << 20)
        var written = 0
        do {
            while true {
                let data = pattern(32 * 1024, seed: UInt8(truncatingIfNeeded: written >> 15))
                try pool.openVolume(name: "v").write(at: UInt64(written), from: data)
                model.write("v", at: written, data)
                written += data.count
            }
        } catch PoolError.poolFull {}
        try pool.snapshot(source: "v", name: "s")
        model.branch("v", "s", snapshot: true)
        try pool.sync()
        let simulator = CrashSimulator(seed: seed, workload: "near-full", physicalSectorByteCount: sector, initial: model)
        simulator.attach(to: device)
        var label = ""

        var generator = SeededGenerator(seed: seed)
        let steps = ProcessInfo.processInfo.environment["LOGPOOL_LONG"] == nil ? 40 : 400
        for step in 0..<steps {
            let roll = Int.random(in: 0..<100, using: &generator)
            let syncsBefore = device.syncCount
            do {
                if roll < 70 {
                    let block = Int.random(in: 0..<(written / 4096), using: &generator)
                    let data = pattern(4096 * Int.random(in: 1...3, using: &generator), seed: UInt8(truncatingIfNeeded: step))
                    let offset = min(block * 4096, written - data.count)
                    label = "write \(offset) \(data.count)"
                    try pool.openVolume(name: "v").write(at: UInt64(offset), from: data)
                    model.write("v", at: offset, data)
                } else if roll < 78, model.volumes["s"] != nil {
                    label = "delete s"
                    try pool.delete(name: "s")
                    model.delete("s")
                } else if roll < 85 {
                    let offset = Int.random(in: 0..<(written / 4096), using: &generator) * 4096
                    label = "discard \(offset)"
                    try pool.openVolume(name: "v").discard(at: UInt64(offset), length: 8192)
                    model.discard("v", at: offset, length: 8192)
                } else if roll < 92 {
                    label = "sync"
                    try pool.sync()
                } else {
                    label = "compact"
                    _ = try pool.compact()
                }
            } catch PoolError.poolFull {
                // Allowed while the snapshot pins the old blocks; nothing changed.
                label += " (poolFull)"
            }
            if device.syncCount > syncsBefore { simulator.madeDurable() }
            simulator.opFinished(label, model: model)
            if roll >= 85 && roll < 92 { simulator.madeDurable() }
            #expect(pool.internalConsistencyProblems() == [], "seed \(seed) step \(step)")
        }
        device.beforeSync = nil
        let figures = simulator.figures
        print("near-full crash enumeration seed \(seed) (sector \(sector)): \(steps) ops, \(figures.uniqueTotal) unique crash states, \(figures.violationCounts) violations")
        #expect(figures.violations.isEmpty, "\(figures.violations.map(\.description).joined(separator: "\n"))")
        #expect(try contents(of: pool) == logical(model))
    }
}
