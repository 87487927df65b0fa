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
            for fault in CrashWorkloads.Fault.allCases {
                let outcome = try CrashWorkloads.fault(fault, at: fault == .fsyncError ? max(1, k / 4) : k, seed: seed, opCount: 60)
                if outcome.fired { fired += 1 }
                #expect(outcome.violations.isEmpty, "seed \(seed) \(fault) at \(k): \(outcome.violations)")
            }
        }
        #expect(fired >= 16, "only \(fired) faults fired")
    }

    /// Goal: the bounded-exhaustive seq-1 workloads (every core op, alone, then nothing,
    /// a sync or a checkpoint) at 4 KiB sectors; `logpool crashsim` runs them at 512 and
    /// seq-2 too. Every crash state of each recovers to a valid prefix.
    @Test("every seq-1 workload recovers from every crash state at 4 KiB sectors")
    func sequences() throws {
        var unique = 0
        for index in 0..<UInt64(CrashWorkloads.choicesPerStep) {
            let figures = try CrashWorkloads.sequence(index: index, length: 1, physicalSectorByteCount: 4096).figures
            unique += figures.uniqueTotal
            #expect(figures.violations.isEmpty, "seq-1 #\(index) \(CrashWorkloads.sequenceSteps(index: index, length: 1)): \(figures.violations.map(\.description).joined(separator: "\n"))")
        }
        #expect(unique > 500, "only \(unique) unique crash states")
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
        let steps = ProcessInfo.processInfo.environment["LOGPOOL_LONG"] == nil ? 40 : 400
        let simulator = try CrashWorkloads.nearFull(seed: seed, steps: steps, physicalSectorByteCount: sector)
        let figures = simulator.figures
        print("near-full crash enumeration seed \(seed) (sector \(sector)): \(steps) ops, \(figures.uniqueTotal) unique crash states, \(figures.violationCounts) violations")
        #expect(figures.violations.isEmpty, "\(figures.violations.map(\.description).joined(separator: "\n"))")
        #expect((figures.marks["pool-full"] ?? 0) > 0, "the workload never hit poolFull")
    }
}

@Suite("Crash simulation shrinking")
struct ShrinkTests {
    /// Goal: a failing workload shrinks to a few ops that still fail. Method: an extra
    /// check that "fails" whenever a recovered pool holds a clone that was written after
    /// cloning (it differs from every other volume); a random workload that trips it is
    /// shrunk, and the result must be small and still trip it.
    @Test("a failing random workload shrinks to a minimal op list that still fails")
    func shrink() throws {
        let check: (Pool) -> String? = { pool in
            guard let all = try? contents(of: pool) else { return nil }
            for (name, entry) in all where name.hasPrefix("c") && !entry.isSnapshot {
                if !all.contains(where: { $0.key != name && $0.value.bytes == entry.bytes }) { return "clone \(name) was written" }
            }
            return nil
        }
        var found: (seed: UInt64, ops: [Op])? = nil
        for seed in UInt64(1)...40 {
            let simulator = try CrashWorkloads.explicit(randomOps(seed: seed, count: 30), seed: seed, physicalSectorByteCount: 512, samples: 1) {
                $0.extraCheck = check
            }
            if !simulator.figures.violations.isEmpty { found = (seed, simulator.ops); break }
        }
        let (seed, ops) = try #require(found, "no seed in 1...40 wrote to a clone")
        let small = CrashWorkloads.shrink(ops, seed: seed, physicalSectorByteCount: 512, invariant: "extra", seconds: 60) {
            $0.extraCheck = check
        }
        print("shrunk seed \(seed) from \(ops.count) to \(small.count) ops: \(small)")
        #expect(small.count <= 4 && small.count < ops.count, "seed \(seed): \(small)")
        let again = try CrashWorkloads.explicit(small, seed: seed, physicalSectorByteCount: 512, samples: 1) { $0.extraCheck = check }
        #expect(again.figures.violations.contains { $0.invariant == "extra" })
    }

    /// The first `count` ops the random workload of `seed` draws.
    func randomOps(seed: UInt64, count: Int) -> [Op] {
        var model = ReferenceModel()
        model.create("a", size: 16 * 4096)
        model.create("b", size: 8 * 4096)
        var generator = WorkloadGenerator(seed: seed, weights: .swarm(seed: seed))
        return (0..<count).map { _ in
            let op = generator.next(model)
            apply(op, to: &model)
            return op
        }
    }
}
