import Foundation
import LogPool

/// Workloads the crash simulator runs (Specs/CRASH-MODEL.md §7), shared by the
/// tests and `logpool-sim crashsim`.
public enum CrashWorkloads {
    /// The workload name an id carries: "random-512" or "random-4096" (the physical
    /// sector size of the simulated device).
    public static func randomName(physicalSectorByteCount: Int) -> String { "random-\(physicalSectorByteCount)" }

    /// The test geometry (8 MiB pool, 4 KiB blocks, 64 KiB segments; LZ4 for even seeds)
    /// with volumes "a" (16 blocks) and "b" (8 blocks), checkpointed, and the matching model.
    static func testPool(seed: UInt64) throws -> (SimulatedDevice, Pool, ReferenceModel) {
        let device = SimulatedDevice(byteCount: 8 << 20)
        let pool = try Pool.create(on: device, capacity: 8 << 20, blockSize: 4096, segmentSize: 64 << 10,
                                   compression: seed % 2 == 0 ? .lz4 : .none)
        var model = ReferenceModel()
        try pool.createVolume(name: "a", size: 16 * 4096)
        model.create("a", size: 16 * 4096)
        try pool.createVolume(name: "b", size: 8 * 4096)
        model.create("b", size: 8 * 4096)
        // A checkpoint, not a sync: a batch synced before the simulator attaches must not
        // be the newest synced batch, whose damage is unprovable (FORMAT J-7).
        try pool.checkpoint()
        return (device, pool, model)
    }

    /// Seeded random operations (writes of many sizes and alignments, discards,
    /// snapshots, clones, deletes, renames, resizes, syncs, checkpoints) on the 8 MiB test
    /// geometry (4 KiB blocks, 64 KiB segments; LZ4 for even seeds), with crash states
    /// enumerated at every sync after the pool is made. Returns the simulator with its
    /// figures. `only` restricts the run to one state (replay).
    public static func random(seed: UInt64, opCount: Int, physicalSectorByteCount: Int, samples: Int = 3, compoundEvery: Int = 0, lyingSync: Bool = false,
                              only: CrashStateID? = nil, onViolation: ((CrashViolation) -> Void)? = nil) throws -> CrashSimulator {
        var (device, pool, model) = try testPool(seed: seed)
        let simulator = CrashSimulator(seed: seed, workload: randomName(physicalSectorByteCount: physicalSectorByteCount),
                                       physicalSectorByteCount: physicalSectorByteCount, samples: samples, initial: model)
        simulator.only = only
        simulator.onViolation = onViolation
        simulator.lyingSync = lyingSync
        simulator.compoundEvery = compoundEvery
        simulator.attach(to: device)
        defer { simulator.detach(from: device) }
        var workload = WorkloadGenerator(seed: seed, weights: .swarm(seed: seed))
        for _ in 0..<opCount {
            let op = workload.next(model)
            try step(op, pool: &pool, device: device, model: &model, simulator: simulator)
            if let only, device.syncCount >= only.point { break }
        }
        let problems = pool.internalConsistencyProblems()
        if !problems.isEmpty {
            throw PoolError.invalidArgument("the live pool of seed \(seed) is inconsistent after the workload: \(problems.prefix(3))")
        }
        return simulator
    }

    /// Runs one op under the simulator: applies it, records its state and what its
    /// success made durable.
    static func step(_ op: Op, pool: inout Pool, device: SimulatedDevice, model: inout ReferenceModel, simulator: CrashSimulator) throws {
        let syncsBefore = device.syncCount
        let cacheBefore = pool.cacheEvents
        defer { markCacheEvents(since: cacheBefore, pool, simulator) }
        var after = model
        apply(op, to: &after)
        simulator.opStarting(after)
        try apply(op, to: &pool, model: &model, reopen: { try Pool.open(on: device) })
        if case .reopen = op { simulator.mark("reopened-clean") }
        // A sync inside this op made everything before it durable.
        if device.syncCount > syncsBefore { simulator.madeDurable() }
        simulator.opFinished(op, model: model)
        if op.isDurabilityPoint { simulator.madeDurable() }
        if device.syncCount > syncsBefore, !pool.hasUnsyncedChanges { try checkSpaceState(pool, device, simulator: simulator, after: "\(op)") }
    }

    /// Memory pressure (a tiny metadata cache, `--metadata-cache`) during one op: evicted
    /// leaves read back, and checkpoints the dirty-leaf bound started.
    static func markCacheEvents(since before: Pool.CacheEvents, _ pool: Pool, _ simulator: CrashSimulator) {
        let after = pool.cacheEvents
        if after.leafRereads > before.leafRereads { simulator.mark("leaf-reread") }
        if after.refcountRereads > before.refcountRereads { simulator.mark("refcount-leaf-reread") }
        if after.boundCheckpoints > before.boundCheckpoints { simulator.mark("dirty-bound-checkpoint") }
        // A pool reopened by the op has counters of its own, so compare only growth.
        if after.sharedLeafCreations > before.sharedLeafCreations { simulator.mark("shared-leaves-created") }
    }

    /// The live engine's space state must be what a reopen of the synced bytes rebuilds
    /// (issue 14, invariant 3: a drift there made `poolFull` untrue); checked after every
    /// op that synced. A difference fails the workload, naming both values.
    static func checkSpaceState(_ pool: Pool, _ device: SimulatedDevice, simulator: CrashSimulator, after label: String) throws {
        let reopened = try Pool.open(on: SimulatedDevice(image: device.currentImage), mode: .readOnly)
        let differences = pool.spaceStateDifferences(from: reopened)
        simulator.mark("space-state-checked")
        guard differences.isEmpty else { throw SpaceStateDrift(after: label, differences: differences) }
    }

    /// An explicit op list on the random workloads' test pool of `seed` (shrinking
    /// replays these). An op that no longer applies once others were dropped (a name
    /// that does not exist, an offset past a shrunk volume) is skipped: the engine
    /// refuses it before changing anything.
    public static func explicit(_ ops: [Op], seed: UInt64, physicalSectorByteCount: Int, samples: Int = 3,
                                configure: (CrashSimulator) -> Void = { _ in }) throws -> CrashSimulator {
        var (device, pool, model) = try testPool(seed: seed)
        let simulator = CrashSimulator(seed: seed, workload: "explicit-\(physicalSectorByteCount)",
                                       physicalSectorByteCount: physicalSectorByteCount, samples: samples, initial: model)
        simulator.violationLimit = 1
        configure(simulator)
        simulator.attach(to: device)
        defer { simulator.detach(from: device) }
        for op in ops where isApplicable(op, to: model) {
            do {
                try step(op, pool: &pool, device: device, model: &model, simulator: simulator)
            } catch PoolError.notFound, PoolError.exists, PoolError.outOfRange, PoolError.invalidArgument, PoolError.readOnly {
                continue
            }
            if !simulator.figures.violations.isEmpty { break }
        }
        return simulator
    }

    /// Shrinks `ops` to a smaller list whose crash enumeration still shows a violation
    /// of `invariant` (delta debugging: drop halves, then quarters, ... then single ops,
    /// while the failure persists). Stops after `seconds`. Returns the smallest list found.
    public static func shrink(_ ops: [Op], seed: UInt64, physicalSectorByteCount: Int, invariant: String, seconds: Double = 60,
                              configure: (CrashSimulator) -> Void = { _ in }) -> [Op] {
        let started = Date()
        func fails(_ candidate: [Op]) -> Bool {
            guard let simulator = try? explicit(candidate, seed: seed, physicalSectorByteCount: physicalSectorByteCount, configure: configure)
            else { return false }
            return simulator.figures.violations.contains { $0.invariant == invariant }
        }
        var current = ops
        var chunk = max(1, current.count / 2)
        while chunk >= 1 && Date().timeIntervalSince(started) < seconds {
            var removed = false
            var start = 0
            while start < current.count && Date().timeIntervalSince(started) < seconds {
                let candidate = Array(current[..<start] + current[min(current.count, start + chunk)...])
                if !candidate.isEmpty && fails(candidate) {
                    current = candidate
                    removed = true
                } else {
                    start += chunk
                }
            }
            if !removed { chunk /= 2 }
        }
        return current
    }

    // MARK: Bounded-exhaustive sequences

    /// The core ops of the bounded-exhaustive workloads (CRASH-MODEL §7), each on two volumes of
    /// four blocks ("a", "b"; "b" may be renamed to "b2" and back). An op that does not
    /// apply to the state it meets (deleting a snapshot when there is none) is a no-op.
    public static let coreOps = ["write-aligned", "write-unaligned", "overwrite", "discard", "snapshot", "clone",
                                 "delete-snapshot", "delete-volume", "resize-grow", "resize-shrink", "rename", "compact"]
    /// What follows each op: nothing, a sync, a checkpoint, or a clean close and reopen.
    public static let followers = ["", "sync", "checkpoint", "reopen"]
    /// Choices per step: core op × follower.
    public static var choicesPerStep: Int { coreOps.count * followers.count }

    /// The workload name of a sequence of `length` steps.
    public static func sequenceName(length: Int, physicalSectorByteCount: Int) -> String {
        "seq\(length)-\(physicalSectorByteCount)"
    }

    /// The steps of sequence `index` (its digits in base `choicesPerStep`, first step
    /// lowest), as "op" or "op+sync".
    public static func sequenceSteps(index: UInt64, length: Int) -> [String] {
        var rest = index
        return (0..<length).map { _ in
            let choice = Int(rest % UInt64(choicesPerStep))
            rest /= UInt64(choicesPerStep)
            let follower = followers[choice / coreOps.count]
            return coreOps[choice % coreOps.count] + (follower.isEmpty ? "" : "+" + follower)
        }
    }

    /// Bounded-exhaustive workload `index` of `length` steps (seq-1, seq-2, seq-3 of
    /// Specs/CRASH-MODEL.md §7): a pool with "a" and "b" (4 blocks each, written and synced)
    /// and a snapshot "s0" of "b", then each step's op and its follower, with crash
    /// states enumerated at every sync. The id's seed is the sequence index.
    public static func sequence(index: UInt64, length: Int, physicalSectorByteCount: Int, samples: Int = 3, lyingSync: Bool = false,
                                only: CrashStateID? = nil, onViolation: ((CrashViolation) -> Void)? = nil) throws -> CrashSimulator {
        let device = SimulatedDevice(byteCount: 8 << 20)
        var pool = try Pool.create(on: device, capacity: 8 << 20, blockSize: 4096, segmentSize: 64 << 10,
                                   compression: index % 2 == 0 ? .none : .lz4)
        var model = ReferenceModel()
        for name in ["a", "b"] {
            try pool.createVolume(name: name, size: 4 * 4096)
            model.create(name, size: 4 * 4096)
            let data = pattern(4 * 4096, seed: name == "a" ? 1 : 2)
            try pool.openVolume(name: name).write(at: 0, from: data)
            model.write(name, at: 0, data)
        }
        try pool.snapshot(source: "b", name: "s0")
        model.branch("b", "s0", snapshot: true)
        // A checkpoint: the setup's batch is history the simulator never saw, so it must
        // not be the newest synced batch (media damage to it would be unprovable, J-7).
        try pool.checkpoint()
        let simulator = CrashSimulator(seed: index, workload: sequenceName(length: length, physicalSectorByteCount: physicalSectorByteCount),
                                       physicalSectorByteCount: physicalSectorByteCount, samples: samples, initial: model)
        simulator.only = only
        simulator.onViolation = onViolation
        simulator.lyingSync = lyingSync
        simulator.attach(to: device)
        defer { simulator.detach(from: device) }
        var counter = 0
        for step in sequenceSteps(index: index, length: length) {
            let parts = step.split(separator: "+").map(String.init)
            counter += 1
            var ops: [Op] = []
            if let op = coreOp(parts[0], model: model, counter: counter) { ops.append(op) }
            if parts.count > 1 { ops.append(parts[1] == "sync" ? .sync : parts[1] == "reopen" ? .reopen : .checkpoint) }
            for op in ops { try CrashWorkloads.step(op, pool: &pool, device: device, model: &model, simulator: simulator) }
            if let only, device.syncCount >= only.point { break }
        }
        let problems = pool.internalConsistencyProblems()
        if !problems.isEmpty {
            throw PoolError.invalidArgument("sequence \(index) (\(sequenceSteps(index: index, length: length))): the live pool is inconsistent: \(problems.prefix(3))")
        }
        return simulator
    }

    /// The concrete op for a core op name in the current model state, or nil when it
    /// does not apply.
    static func coreOp(_ name: String, model: ReferenceModel, counter: Int) -> Op? {
        let b = model.volumes["b"] != nil ? "b" : model.volumes["b2"] != nil ? "b2" : nil
        let size = model.volumes["a"]?.bytes.count ?? 0
        let snapshots = model.volumes.filter { $0.value.isSnapshot }.keys.sorted()
        let clones = model.volumes.keys.filter { $0.hasPrefix("c") }.sorted()
        let data = pattern(8192, seed: UInt64(counter) &* 7919)
        switch name {
        case "write-aligned": return size >= 8192 ? .write("a", 4096, Array(data[0..<4096])) : nil
        case "write-unaligned": return size >= 12288 ? .write("a", 4096 + 2000, Array(data[0..<4096])) : nil
        case "overwrite": return size >= 8192 ? .write("a", 0, data) : nil
        case "discard": return size >= 16384 ? .discard("a", 8192, 8192) : size > 0 ? .discard("a", 0, size) : nil
        case "snapshot": return model.volumes.count < 6 ? .snapshot("a", "s\(counter)") : nil
        case "clone": return model.volumes.count < 6 ? .clone("a", "c\(counter)") : nil
        case "delete-snapshot": return snapshots.last.map { .delete($0) }
        case "delete-volume": return (clones.last ?? b).map { .delete($0) }
        case "resize-grow": return size < 8 * 4096 ? .resize("a", size + 4096) : nil
        case "resize-shrink": return size > 4096 ? .resize("a", size - 4096) : nil
        case "rename": return b.map { .rename($0, $0 == "b" ? "b2" : "b") }
        case "compact": return .compact
        default: return nil
        }
    }

    /// The workload name an id carries for the near-full workload.
    public static func nearFullName(physicalSectorByteCount: Int) -> String { "near-full-\(physicalSectorByteCount)" }

    /// Crash safety where space is reused (holes, compaction, checkpoints forced by
    /// admission, `poolFull`): an 8 MiB pool is filled until `poolFull`, a snapshot pins
    /// it, then `steps` seeded overwrites, snapshot deletes, discards, syncs and
    /// compactions run with crash states enumerated at every sync. An op that throws
    /// `poolFull` must change nothing (invariant 10: the model is not changed, and the
    /// next state must still match).
    public static func nearFull(seed: UInt64, steps: Int, physicalSectorByteCount: Int, samples: Int = 3, compoundEvery: Int = 0, lyingSync: Bool = false,
                                only: CrashStateID? = nil, onViolation: ((CrashViolation) -> Void)? = nil) throws -> CrashSimulator {
        let device = SimulatedDevice(byteCount: 8 << 20)
        var pool = try Pool.create(on: device, capacity: 8 << 20, blockSize: 4096, segmentSize: 64 << 10, compression: .none)
        var model = ReferenceModel()
        try pool.createVolume(name: "v", size: 7 << 20)
        model.create("v", size: 7 << 20)
        var written = 0
        do {
            while true {
                let data = pattern(32 * 1024, seed: UInt64(written >> 15))
                try pool.openVolume(name: "v").write(at: UInt64(written), from: data)
                model.write("v", at: written, data)
                written += data.count
            }
        } catch PoolError.poolFull {}
        try pool.snapshot(source: "v", name: "s")
        model.branch("v", "s", snapshot: true)
        // A checkpoint, so the crash states start from a state the model knows in full
        // (the fill's journal batches are history the simulator never saw).
        try pool.checkpoint()
        let simulator = CrashSimulator(seed: seed, workload: nearFullName(physicalSectorByteCount: physicalSectorByteCount),
                                       physicalSectorByteCount: physicalSectorByteCount, samples: samples, initial: model)
        simulator.only = only
        simulator.onViolation = onViolation
        simulator.lyingSync = lyingSync
        simulator.scrubEvery = 8
        simulator.compoundEvery = compoundEvery
        simulator.attach(to: device)
        defer { simulator.detach(from: device) }
        var generator = SeededGenerator(seed: seed)
        // Blocks of v discarded and not written since: an overwrite there needs new space.
        var unmappedBlocks = Set<Int>()
        for step in 0..<steps {
            let roll = Int.random(in: 0..<100, using: &generator)
            // Once the snapshot is gone v owns every block it maps alone, so a large
            // overwrite of mapped blocks must never be poolFull (promise 4; a 1 MiB
            // overwrite failed on pools of 4-24 MiB until COMMIT §5.1's headroom counted
            // a whole unit at its worst).
            let exclusiveRange: Range<Int>? = {
                guard roll < 10, model.volumes["s"] == nil else { return nil }
                let length = [1 << 20, 768 << 10, (1 << 20) - 4096][roll % 3]
                guard written >= length else { return nil }
                for _ in 0..<8 {
                    let offset = Int.random(in: 0...((written - length) / 4096), using: &generator) * 4096
                    if (offset / 4096..<(offset + length) / 4096).allSatisfy({ !unmappedBlocks.contains($0) }) {
                        return offset..<offset + length
                    }
                }
                return nil
            }()
            let syncsBefore = device.syncCount
            let generationBefore = pool.stats.generation
            let stats = pool.stats
            let nearlyFull = stats.unwrittenBytes < stats.capacityBytes / 10
            let cacheBefore = pool.cacheEvents
            var label = ""
            do {
                if let range = exclusiveRange {
                    let data = pattern(range.count, seed: seed &* 1000 &+ UInt64(step))
                    label = "write(v, \(range.lowerBound), \(range.count)) exclusive"
                    var after = model
                    after.write("v", at: range.lowerBound, data)
                    simulator.opStarting(after)
                    do {
                        try pool.openVolume(name: "v").write(at: UInt64(range.lowerBound), from: data)
                    } catch PoolError.poolFull(let needed, let available, _) {
                        throw PoolError.invalidArgument("near-full seed \(seed) step \(step): \(label) of blocks v owns alone failed with poolFull (need \(needed), \(available) available): promise 4")
                    }
                    model.write("v", at: range.lowerBound, data)
                    simulator.mark("large-exclusive-overwrite")
                } else if roll < 70 {
                    let block = Int.random(in: 0..<(written / 4096), using: &generator)
                    let data = pattern(4096 * Int.random(in: 1...3, using: &generator), seed: seed &* 1000 &+ UInt64(step))
                    let offset = min(block * 4096, written - data.count)
                    label = "write(v, \(offset), \(data.count))"
                    var after = model
                    after.write("v", at: offset, data)
                    simulator.opStarting(after)
                    try pool.openVolume(name: "v").write(at: UInt64(offset), from: data)
                    model.write("v", at: offset, data)
                    for b in offset / 4096..<(offset + data.count) / 4096 { unmappedBlocks.remove(b) }
                } else if roll < 78, model.volumes["s"] != nil {
                    label = "delete(s)"
                    var after = model
                    after.delete("s")
                    simulator.opStarting(after)
                    try pool.delete(name: "s")
                    model.delete("s")
                } else if roll < 85 {
                    let offset = Int.random(in: 0..<(written / 4096), using: &generator) * 4096
                    label = "discard(v, \(offset), 8192)"
                    var after = model
                    after.discard("v", at: offset, length: 8192)
                    simulator.opStarting(after)
                    try pool.openVolume(name: "v").discard(at: UInt64(offset), length: 8192)
                    model.discard("v", at: offset, length: 8192)
                    unmappedBlocks.formUnion([offset / 4096, offset / 4096 + 1])
                } else if roll < 92 {
                    label = "sync"
                    try pool.sync()
                } else if roll < 95 {
                    // A clean close and a reopen: the next change commits the mounted flag
                    // and appends resume in the root's segment (COMMIT §4 step 7, R-3).
                    label = "reopen"
                    try pool.close()
                    pool = try Pool.open(on: device)
                    simulator.mark("reopened-clean")
                } else {
                    label = "compact"
                    _ = try pool.compact()
                }
            } catch PoolError.poolFull {
                // Allowed while the snapshot pins the old blocks; nothing may change
                // (invariant 10: the pool still reads as the model before the op).
                label += " (poolFull)"
                simulator.mark("pool-full")
                if try CrashSimulator.digest(contents(of: pool)) != CrashSimulator.digest(logical(model)) {
                    throw PoolError.invalidArgument("near-full seed \(seed) step \(step): \(label) changed the pool")
                }
            }
            // A checkpoint ran (forced by admission, or by a compaction) on a full pool.
            if pool.stats.generation > generationBefore, nearlyFull { simulator.mark("checkpoint-on-full-pool") }
            markCacheEvents(since: cacheBefore, pool, simulator)
            if device.syncCount > syncsBefore { simulator.madeDurable() }
            simulator.opFinished(label, model: model)
            if roll >= 85 && roll < 95 { simulator.madeDurable() }
            if device.syncCount > syncsBefore, !pool.hasUnsyncedChanges {
                try checkSpaceState(pool, device, simulator: simulator, after: "near-full seed \(seed) step \(step): \(label)")
            }
            let problems = pool.internalConsistencyProblems()
            if !problems.isEmpty {
                throw PoolError.invalidArgument("near-full seed \(seed) step \(step): the live pool is inconsistent: \(problems.prefix(3))")
            }
            if let only, device.syncCount >= only.point { break }
        }
        if only == nil, try contents(of: pool) != logical(model) {
            throw PoolError.invalidArgument("near-full seed \(seed): the live pool does not read back as the model")
        }
        return simulator
    }

    /// Deterministic, block-distinct test data: every 8-byte word names the seed and its
    /// position, so no two writes of different seeds (or offsets) share a block.
    static func pattern(_ count: Int, seed: UInt64) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var i = 0
        while i < count {
            let word = (seed &* 0x9E37_79B9_7F4A_7C15) ^ UInt64(i)
            for b in 0..<min(8, count - i) { bytes[i + b] = UInt8(truncatingIfNeeded: word >> (8 * UInt64(b))) }
            i += 8
        }
        return bytes
    }

    /// Which device call a fault run fails, and how.
    public enum Fault: String, CaseIterable, Sendable {
        /// C9 index 0: the k-th write returns EIO.
        case writeError = "write-eio"
        /// C9 index 1: the k-th write stores part of its bytes (a short `pwrite`), then
        /// the rest fails with ENOSPC.
        case shortWrite = "write-short-enospc"
        /// C9 index 2: every write from the k-th on fails with ENOSPC (the file system
        /// under a sparse pool file is full).
        case noSpace = "write-enospc"
        /// C8: the k-th sync returns EIO and the epoch's writes are lost (fsyncgate).
        case fsyncError = "fsync-eio"

        public var crashClass: CrashClass { self == .fsyncError ? .fsyncEIO : .writeErr }
        public var index: Int { self == .shortWrite ? 1 : self == .noSpace ? 2 : 0 }

        public init?(crashClass: CrashClass, index: Int) {
            guard let fault = Fault.allCases.first(where: { $0.crashClass == crashClass && $0.index == index }) else { return nil }
            self = fault
        }
    }

    /// The C8/C9 runs of one random workload (an I/O-error loop over k drawn from the
    /// seed): `perKind` runs of each fault. Ids are `v1:seed:random-512:k:class:variant`.
    public static func faultRuns(seed: UInt64, opCount: Int, perKind: Int) throws -> CrashFigures {
        var figures = CrashFigures()
        var generator = SeededGenerator(seed: seed ^ 0xFA17)
        var seen = Set<CrashStateID>()
        for fault in Fault.allCases {
            for _ in 0..<perKind {
                // A random workload issues about one write per op and one sync per three.
                let k = Int.random(in: 1...max(1, fault == .fsyncError ? opCount / 3 : opCount), using: &generator)
                let id = CrashStateID(seed: seed, workload: randomName(physicalSectorByteCount: 512), point: k,
                                      crashClass: fault.crashClass, index: fault.index)
                figures.generated[fault.crashClass.rawValue, default: 0] += 1
                guard seen.insert(id).inserted else { continue }
                let outcome = try self.fault(fault, at: k, seed: seed, opCount: opCount)
                guard outcome.fired else { continue }
                figures.unique[fault.crashClass.rawValue, default: 0] += 1
                if outcome.violations.isEmpty {
                    figures.mark(fault == .fsyncError ? "fsync-eio-fail-stop" : "write-err-fail-stop")
                }
                for violation in outcome.violations {
                    let invariant = String(violation.prefix(while: { $0 != ":" }))
                    figures.violationCounts[invariant, default: 0] += 1
                    figures.violations.append(CrashViolation(state: id, invariant: invariant, detail: violation))
                }
            }
        }
        return figures
    }

    /// The outcome of one fault run.
    public struct FaultOutcome: Sendable {
        /// The fault fired (the workload reached the k-th call).
        public var fired: Bool
        /// Violations, as "invariant: detail".
        public var violations: [String]
    }

    /// Runs the random workload of `seed` with the `k`-th write or sync failing, then
    /// checks (Specs/CRASH-MODEL.md §2 C8/C9, CRASH-MODEL §5): the failing op throws a typed `io` error;
    /// the pool fails stop (every later call throws `poisoned`); the durable image then
    /// opens to a model state from the last durable op on; verify and scrub find nothing
    /// after that recovery.
    public static func fault(_ fault: Fault, at k: Int, seed: UInt64, opCount: Int) throws -> FaultOutcome {
        var (device, pool, model) = try testPool(seed: seed)
        var states = [logical(model)]
        var durableIndex = 0
        switch fault {
        case .writeError:
            device.failWriteAt = device.writeCount + k
        case .shortWrite:
            device.failWriteAt = device.writeCount + k
            device.failWriteErrno = 28
            device.failWriteShortByteCount = 512 * (1 + k % 8)
        case .noSpace:
            device.failWriteAt = device.writeCount + k
            device.failWriteErrno = 28
            device.failWritePersistent = true
        case .fsyncError:
            device.failSyncAt = device.syncCount + k
            device.failSyncKeepSeed = seed &* 31 &+ UInt64(k)
        }
        var workload = WorkloadGenerator(seed: seed, weights: .swarm(seed: seed))
        var violations: [String] = []
        var failedOp: String? = nil
        // The state the failing op would have left: a sync inside it (after its record)
        // may have made it durable before the failure.
        var inProgress: [String: ReferenceModel.Entry]? = nil
        for _ in 0..<opCount {
            let op = workload.next(model)
            let syncsBefore = device.syncCount
            var after = model
            apply(op, to: &after)
            do {
                try apply(op, to: &pool, model: &model, reopen: { try Pool.open(on: device) })
            } catch PoolError.io {
                failedOp = op.description
                inProgress = logical(after)
                break
            } catch {
                violations.append("open: \(op) threw \(error), not io")
                failedOp = op.description
                break
            }
            if device.syncCount > syncsBefore { durableIndex = states.count - 1 }
            states.append(logical(model))
            if op.isDurabilityPoint { durableIndex = states.count - 1 }
        }
        guard let failedOp else { return FaultOutcome(fired: false, violations: violations) }
        // Fail-stop: nothing may be retried on this handle.
        do {
            try pool.sync()
            violations.append("fail-stop: sync after the failed \(failedOp) succeeded")
        } catch PoolError.poisoned {
        } catch PoolError.closed where failedOp == Op.reopen.description {
            // The close of a reopen failed: the handle is closed all the same.
        } catch {
            violations.append("fail-stop: sync after the failed \(failedOp) threw \(error), not poisoned")
        }
        // A crash now leaves the durable image.
        do {
            let recovered = SimulatedDevice(image: device.durable)
            let reopened = try Pool.open(on: recovered)
            let got = try contents(of: reopened)
            if !states[durableIndex...].contains(where: { $0 == got }) && got != inProgress {
                violations.append("prefix: after the failed \(failedOp), the reopened pool matches no state from the last durable op on")
            }
            let report = try Pool.verify(on: SimulatedDevice(image: recovered.currentImage), scrubData: true)
            if !report.problems.isEmpty { violations.append("verify-after: \(report.problems.prefix(3))") }
        } catch {
            violations.append("open: reopening after the failed \(failedOp): \(error)")
        }
        return FaultOutcome(fired: true, violations: violations)
    }
}

/// The live engine's space state differs from what a reopen rebuilds.
public struct SpaceStateDrift: Error, CustomStringConvertible {
    public var after: String
    public var differences: [String]
    public var description: String { "space state after \(after) differs from a reopen: \(differences.prefix(4).joined(separator: "; "))" }
}
