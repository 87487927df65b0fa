import ArgumentParser
import Foundation
import Synchronization
import LogPool
import LogPoolCLIKit
import LogPoolTesting

/// `logpool-sim crashsim`: seeded random workloads on the in-memory test device, with every
/// crash state of classes C0–C5 recovered and checked at every sync
/// (Specs/CRASH-MODEL.md). Prints the figures; exit 1 on any violation.
struct CrashSim: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "crashsim",
        abstract: "Crash simulation: recover every crash state of seeded workloads and check the invariants.")
    @Option(help: "Run seed: workloads use seed, seed+1, ...") var seed: UInt64 = 1
    @Flag(help: "Long mode: 300-op workloads, more samples per crash point.") var long = false
    @Option(help: "Stop starting new workloads after this many seconds.") var budget: Double = 60
    @Option(help: "Operations per workload (default 60, 300 with --long).") var ops: Int?
    @Flag(help: "One JSON object with the figures.") var json = false
    @Option(help: "Replay one crash state by its id (v1:seed:workload:point:class:index) and write its image.") var replay: String?
    @Option(help: "Metadata cache budget in bytes for every pool the run opens (4096 = one block-table page: every lookup reads pages back; default: the library's 64 MiB).") var metadataCache: Int?

    struct Output: Encodable {
        var seed: UInt64
        var mode: String
        var workloads: Int
        var workloadKinds: [String: Int]
        var opsPerRandomWorkload: Int
        var seconds: Double
        var statesPerSecond: Double
        var figures: CrashFigures
        var openMillisecondsP50: Double
        var openMillisecondsP99: Double
        var openMillisecondsMax: Double
    }

    func run() throws {
        if let ops, ops < 1 || ops > 100_000 { throw ValidationError("--ops must be 1...100000, not \(ops)") }
        if let metadataCache {
            guard metadataCache >= 4096, metadataCache <= 1 << 40 else {
                throw ValidationError("--metadata-cache must be 4096...2^40 bytes, not \(metadataCache)")
            }
            Pool.overrideMetadataCacheBytes(metadataCache)
        }
        if let replay { return try replayState(replay) }
        guard budget > 0, budget <= 86_400 else { throw ValidationError("--budget must be more than 0 and at most 86400 seconds, not \(budget)") }
        let opCount = ops ?? (long ? 300 : 60)
        let samples = long ? 16 : 3
        let started = Date()
        var figures = CrashFigures()
        var counts: [String: Int] = [:]
        var err = StandardError()
        // Bounded-exhaustive sequences first (CRASH-MODEL §7): every seq-1 and a seeded sample of
        // seq-2 in the smoke run; with --long every seq-1 and seq-2 at both sector sizes
        // and a sample of seq-3.
        var jobs: [Job] = []
        let choices = UInt64(CrashWorkloads.choicesPerStep)
        var sampler = SeededGenerator(seed: seed ^ 0x5E0)
        func sample(_ count: Int, of total: UInt64) -> [UInt64] {
            var picked = Set<UInt64>()
            while picked.count < min(count, Int(total)) { picked.insert(UInt64.random(in: 0..<total, using: &sampler)) }
            return picked.sorted()
        }
        for sector in long ? [512, 4096] : [512] {
            jobs += (0..<choices).map { Job.sequence(index: $0, length: 1, sector: sector) }
            let seq2 = long ? Array(0..<choices * choices) : sample(200, of: choices * choices)
            jobs += seq2.map { Job.sequence(index: $0, length: 2, sector: sector) }
        }
        if long { jobs += sample(2000, of: choices * choices * choices).map { Job.sequence(index: $0, length: 3, sector: 4096) } }
        // Then seeded random workloads until the budget is spent: three random to one
        // near-full, alternating sector sizes.
        var next = seed
        var generated = 0
        func moreJobs(_ count: Int) -> [Job] {
            (0..<count).map { _ in
                defer { next &+= 1; generated += 1 }
                let sector = generated % 8 < 4 ? 512 : 4096
                return generated % 4 == 3 ? .nearFull(seed: next, sector: sector) : .random(seed: next, sector: sector)
            }
        }
        // Workloads are independent (their own devices and pools): run batches of four
        // per core (GCD hands them out as cores free up, so a slow workload does not idle
        // the other core) and merge their figures in order.
        let width = max(1, ProcessInfo.processInfo.activeProcessorCount)
        var workloads = 0
        while Date().timeIntervalSince(started) < budget {
            let batchSize = jobs.isEmpty ? 4 * width : min(jobs.count, 32 * width)
            let batch = jobs.isEmpty ? moreJobs(batchSize) : Array(jobs.prefix(batchSize))
            jobs.removeFirst(min(jobs.count, batchSize))
            let results = SharedResults(count: batch.count)
            DispatchQueue.concurrentPerform(iterations: batch.count) { j in
                results.set(j, Result { try run(batch[j], opCount: opCount, samples: samples) })
            }
            for (j, result) in results.all.enumerated() {
                let workloadFigures: CrashFigures
                do {
                    workloadFigures = try result.get()
                } catch {
                    // A workload that cannot even run (its live pool refused an op it
                    // should take, or turned inconsistent) is a violation of its own.
                    var failed = CrashFigures()
                    let id = CrashStateID(seed: batch[j].seed, workload: batch[j].kind, point: 1, crashClass: .none, index: 0)
                    failed.violations = [CrashViolation(state: id, invariant: "workload", detail: "\(batch[j]): \(error)")]
                    failed.violationCounts = ["workload": 1]
                    workloadFigures = failed
                }
                figures.merge(workloadFigures)
                workloads += 1
                counts[batch[j].kind, default: 0] += 1
                if !json && (batch[j].kind == "random" || batch[j].kind == "near-full" || workloadFigures.violationCounts.values.reduce(0, +) > 0) {
                    print("workload \(workloads): \(batch[j]): \(workloadFigures.uniqueTotal) unique states, \(workloadFigures.violationCounts.values.reduce(0, +)) violations", to: &err)
                }
            }
            if !figures.violations.isEmpty { break }
        }
        let seconds = Date().timeIntervalSince(started)
        let out = Output(seed: seed, mode: long ? "long" : "smoke", workloads: workloads, workloadKinds: counts,
                         opsPerRandomWorkload: opCount, seconds: seconds,
                         statesPerSecond: Double(figures.uniqueTotal) / max(seconds, 0.001), figures: figures,
                         openMillisecondsP50: figures.percentile(0.5), openMillisecondsP99: figures.percentile(0.99),
                         openMillisecondsMax: figures.percentile(1))
        if json {
            try printJSON(out)
        } else {
            try printFigures(out)
        }
        if !figures.violations.isEmpty { throw ExitCode(1) }
        // The long run must reach every recovery path it is meant to test (CRASH-MODEL §8).
        let unhit = requiredMarks.filter { (figures.marks[$0] ?? 0) == 0 }
        // A tiny-cache run (the CI's second smoke) must show the cache under pressure.
        let unhitCache = CrashFigures.cacheMarks.filter { unhit.contains($0) }
        if !long && !unhitCache.isEmpty {
            var err = StandardError()
            print("logpool: error: with --metadata-cache \(metadataCache ?? 0), coverage marks never hit: \(unhitCache.joined(separator: ", "))", to: &err)
            throw ExitCode(1)
        }
        if long && !unhit.isEmpty {
            var err = StandardError()
            print("logpool: error: coverage marks never hit in a --long run: \(unhit.joined(separator: ", "))", to: &err)
            throw ExitCode(1)
        }
    }

    /// The coverage marks this run must hit (with a tiny metadata cache, the cache's too).
    var requiredMarks: [String] {
        CrashFigures.requiredMarks + ((metadataCache ?? .max) <= 1 << 16 ? CrashFigures.cacheMarks : [])
    }

    /// One workload of the run.
    enum Job: CustomStringConvertible {
        case sequence(index: UInt64, length: Int, sector: Int)
        case random(seed: UInt64, sector: Int)
        case nearFull(seed: UInt64, sector: Int)

        var seed: UInt64 {
            switch self {
            case .sequence(let index, _, _): index
            case .random(let seed, _), .nearFull(let seed, _): seed
            }
        }

        var kind: String {
            switch self {
            case .sequence(_, let length, _): "seq-\(length)"
            case .random: "random"
            case .nearFull: "near-full"
            }
        }

        var description: String {
            switch self {
            case .sequence(let index, let length, let sector):
                "seq-\(length) #\(index) sector \(sector) \(CrashWorkloads.sequenceSteps(index: index, length: length))"
            case .random(let seed, let sector): "random seed \(seed) sector \(sector)"
            case .nearFull(let seed, let sector): "near-full seed \(seed) sector \(sector)"
            }
        }
    }

    private func run(_ job: Job, opCount: Int, samples: Int) throws -> CrashFigures {
        switch job {
        case .sequence(let index, let length, let sector):
            return try CrashWorkloads.sequence(index: index, length: length, physicalSectorByteCount: sector, samples: samples, lyingSync: long).figures
        case .random(let seed, let sector):
            return try runWorkload(seed: seed, sector: sector, opCount: opCount, samples: samples)
        case .nearFull(let seed, let sector):
            return try CrashWorkloads.nearFull(seed: seed, steps: opCount, physicalSectorByteCount: sector,
                                               samples: samples, compoundEvery: compoundEvery * 4, lyingSync: long).figures
        }
    }

    /// One workload: its crash states (C0-C5) and, on the same seed, C8/C9 runs with one
    /// write, then one sync, failing at points drawn from the seed (an I/O-error loop
    /// over sampled k).
    private func runWorkload(seed: UInt64, sector: Int, opCount: Int, samples: Int) throws -> CrashFigures {
        let simulator = try CrashWorkloads.random(seed: seed, opCount: opCount, physicalSectorByteCount: sector, samples: samples,
                                                  compoundEvery: compoundEvery, lyingSync: long)
        var figures = simulator.figures
        if let first = simulator.figures.violations.first {
            // Shrink to a minimal op list that still fails the same invariant (CRASH-MODEL §8).
            let small = CrashWorkloads.shrink(simulator.ops, seed: seed, physicalSectorByteCount: sector,
                                              invariant: first.invariant, seconds: 60)
            figures.reproducers.append("seed \(seed) sector \(sector), [\(first.invariant)]: \(simulator.ops.count) ops shrunk to \(small.count): \(small.map(\.description).joined(separator: "; "))")
        }
        figures.merge(try CrashWorkloads.faultRuns(seed: seed, opCount: opCount, perKind: long ? 8 : 2))
        return figures
    }

    /// C10/C11 run from one recovered state in this many (near-full: four times fewer).
    var compoundEvery: Int { long ? 24 : 400 }

    private func printFigures(_ out: Output) throws {
        let f = out.figures
        func count(_ dictionary: [String: Int]) -> String {
            CrashClass.allCases.map { "\($0.rawValue) \(dictionary[$0.rawValue] ?? 0)" }.joined(separator: "  ")
        }
        var lines = [
            "crashsim v1 seed=\(out.seed) mode=\(out.mode) geometry=test(8M pool, 4K blocks, 64K segments) sectors=512,4096",
            "workloads \(out.workloads) (" + ["seq-1", "seq-2", "seq-3", "random", "near-full"].map { "\($0) \(out.workloadKinds[$0] ?? 0)" }.joined(separator: ", ")
                + "; \(out.opsPerRandomWorkload) ops per random and near-full workload)   crash points \(f.crashPoints)",
            "  C8/C9 fault runs: \(long ? 8 : 2) per fault kind per random workload (EIO write, short write + ENOSPC, ENOSPC from then on, fsync EIO)",
            "states generated \(f.generatedTotal)   unique \(f.uniqueTotal)",
            "  generated: \(count(f.generated))",
            "  unique:    \(count(f.unique))",
            "recovery ok \(f.outcomes["ok"] ?? 0)   corrupt reported (C6/C7/C12) \(f.outcomes["corrupt-reported"] ?? 0)   newest synced batch lost to damage (C6/C7, unprovable) \(f.outcomes["lost-last-synced-batch"] ?? 0)",
            String(format: "  open p50 %.2f ms  p99 %.2f ms  max %.2f ms   replayed records max %d",
                   out.openMillisecondsP50, out.openMillisecondsP99, out.openMillisecondsMax, f.replayedRecordsMax),
            "violations \(f.violationCounts.values.reduce(0, +)): " + ["open", "prefix", "durability", "silent-wrong-data", "generation", "invariants", "verify-before", "verify-after", "idempotence", "fail-stop"]
                .map { "\($0) \(f.violationCounts[$0] ?? 0)" }.joined(separator: "  "),
            "  write-time (W1-W4, \(f.checkedWrites) writes checked): " + ["overwrite-durable", "rewrite-synced-sector", "pointer-before-pointee", "slot"]
                .map { "\($0) \(f.violationCounts[$0] ?? 0)" }.joined(separator: "  "),
            "coverage marks \(requiredMarks.filter { (f.marks[$0] ?? 0) > 0 }.count)/\(requiredMarks.count) hit: "
                + f.marks.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: "  "),
            "  never hit: " + requiredMarks.filter { (f.marks[$0] ?? 0) == 0 }.joined(separator: " "),
            String(format: "time %.0f s   %.0f states/s (budget %.0f s)", out.seconds, out.statesPerSecond, budget),
        ]
        for v in f.violations {
            lines.append("VIOLATION \(v)")
            lines.append("  replay: logpool-sim crashsim --replay \(v.state)\(long ? " --long" : "")")
        }
        for r in f.reproducers { lines.append("MINIMAL WORKLOAD (on the random workloads' test pool) \(r)") }
        try LogPoolCLIKit.out(lines.joined(separator: "\n"))
    }

    private func replayState(_ text: String) throws {
        guard let id = CrashStateID(text), let dash = id.workload.lastIndex(of: "-"),
              let sector = Int(id.workload[id.workload.index(after: dash)...]), sector == 512 || sector == 4096,
              ["random", "near-full", "seq1", "seq2", "seq3"].contains(id.workload[..<dash])
        else { throw ValidationError("not a crash state id: \(text) (expected v1:SEED:WORKLOAD-SECTOR:POINT:CLASS:INDEX, WORKLOAD one of random, near-full, seq1, seq2, seq3, SECTOR 512 or 4096)") }
        if let fault = CrashWorkloads.Fault(crashClass: id.crashClass, index: id.index) {
            // C8/C9: the workload re-run with its point-th sync or write failing.
            let outcome = try CrashWorkloads.fault(fault, at: id.point, seed: id.seed, opCount: ops ?? 100_000)
            guard outcome.fired else {
                throw PoolError.notFound("crash state \(id): the workload never reached call \(id.point)")
            }
            try out("state \(id) (\(fault.rawValue) at call \(id.point)): \(outcome.violations.isEmpty ? "all invariants hold" : "\(outcome.violations.count) violations")")
            for v in outcome.violations { try out("VIOLATION \(v)") }
            if !outcome.violations.isEmpty { throw ExitCode(1) }
            return
        }
        guard !id.crashClass.isFault else {
            throw ValidationError("crash state \(id): class \(id.crashClass.rawValue) has no variant \(id.index)")
        }
        var found: [CrashViolation] = []
        let samples = max(long ? 16 : 3, id.index % CrashSimulator.earlierEpochIndexBase + 1)
        let lyingSync = long || id.crashClass == .lyingSync
        let simulator = id.workload.hasPrefix("seq")
            ? try CrashWorkloads.sequence(index: id.seed, length: Int(String(id.workload.dropFirst(3).prefix(1))) ?? 1,
                                          physicalSectorByteCount: sector, samples: samples, lyingSync: lyingSync, only: id) { found.append($0) }
            : id.workload.hasPrefix("random")
            ? try CrashWorkloads.random(seed: id.seed, opCount: ops ?? 100_000, physicalSectorByteCount: sector,
                                        samples: samples, compoundEvery: compoundEvery, lyingSync: lyingSync, only: id) { found.append($0) }
            : try CrashWorkloads.nearFull(seed: id.seed, steps: ops ?? 100_000, physicalSectorByteCount: sector,
                                          samples: samples, compoundEvery: compoundEvery * 4, lyingSync: lyingSync, only: id) { found.append($0) }
        guard simulator.figures.generatedTotal > 0 else {
            throw PoolError.notFound("crash state \(id): the workload never reached that crash point or index")
        }
        let imagePath = "crashsim-\(id.seed)-\(id.point)-\(id.crashClass.rawValue)-\(id.index).img"
        if let image = simulator.lastImage {
            do {
                try Data(image).write(to: URL(fileURLWithPath: imagePath))
            } catch {
                throw PoolError.io(errno: EIO, operation: "write \(imagePath): \(error.localizedDescription)", byteOffset: 0)
            }
        }
        try out("state \(id): \(found.isEmpty ? "all invariants hold" : "\(found.count) violations")")
        try out("ops before the crash point: \(simulator.opLog.joined(separator: "; "))")
        for v in found { try out("VIOLATION [\(v.invariant)] \(v.detail)") }
        if let first = found.first, id.workload.hasPrefix("random") {
            let small = CrashWorkloads.shrink(simulator.ops, seed: id.seed, physicalSectorByteCount: sector,
                                              invariant: first.invariant, seconds: 120)
            try out("minimal workload (\(simulator.ops.count) ops shrunk to \(small.count), on the random workloads' test pool of seed \(id.seed)): \(small.map(\.description).joined(separator: "; "))")
        }
        try out("crash image written to \(imagePath)")
        if !found.isEmpty { throw ExitCode(1) }
    }
}

/// Results of concurrent workloads, each slot written by exactly one worker and read
/// after all have finished.
private final class SharedResults: Sendable {
    private let slots: Mutex<[Result<CrashFigures, any Error>?]>
    init(count: Int) { slots = Mutex(Array(repeating: nil, count: count)) }
    func set(_ index: Int, _ value: sending Result<CrashFigures, any Error>) { slots.withLock { $0[index] = value } }
    var all: [Result<CrashFigures, any Error>] { slots.withLock { $0.compactMap { $0 } } }
}
