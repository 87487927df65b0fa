import ArgumentParser
import Foundation
import LogPool
import LogPoolTesting

/// `logpool crashsim`: seeded random workloads on the in-memory test device, with every
/// crash state of classes C0–C5 recovered and checked at every sync
/// (../shared/CRASH-TESTING.md). Prints the figures; exit 1 on any violation.
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

    struct Output: Encodable {
        var seed: UInt64
        var mode: String
        var workloads: Int
        var ops: Int
        var seconds: Double
        var statesPerSecond: Double
        var figures: CrashFigures
        var openMillisecondsP50: Double
        var openMillisecondsP99: Double
        var openMillisecondsMax: Double
    }

    func run() throws {
        if let replay { return try replayState(replay) }
        guard budget > 0, budget <= 86_400 else { throw PoolError.invalidArgument("--budget must be 0...86400 seconds") }
        let opCount = ops ?? (long ? 300 : 60)
        guard opCount >= 1, opCount <= 100_000 else { throw PoolError.invalidArgument("--ops must be 1...100000") }
        let samples = long ? 16 : 3
        let started = Date()
        var figures = CrashFigures()
        var workloads = 0
        var err = StandardError()
        var next = seed
        // Workloads are independent (their own devices and pools): run batches of four
        // per core (GCD hands them out as cores free up, so a slow near-full workload
        // does not idle the other core) and merge their figures in seed order.
        let width = max(1, ProcessInfo.processInfo.activeProcessorCount)
        while Date().timeIntervalSince(started) < budget {
            // Every fourth workload is the near-full one (space reuse, poolFull).
            let batch = (0..<(4 * width)).map { j in
                (seed: next &+ UInt64(j), sector: (workloads + j) % 8 < 4 ? 512 : 4096, nearFull: (workloads + j) % 4 == 3)
            }
            let results = SharedResults(count: batch.count)
            DispatchQueue.concurrentPerform(iterations: batch.count) { j in
                results.set(j, Result {
                    batch[j].nearFull
                        ? try CrashWorkloads.nearFull(seed: batch[j].seed, steps: opCount, physicalSectorByteCount: batch[j].sector,
                                                      samples: samples, compoundEvery: compoundEvery * 4).figures
                        : try runWorkload(seed: batch[j].seed, sector: batch[j].sector, opCount: opCount, samples: samples)
                })
            }
            for (j, result) in results.all.enumerated() {
                let workloadFigures = try result.get()
                figures.merge(workloadFigures)
                workloads += 1
                if !json {
                    print("workload \(workloads): \(batch[j].nearFull ? "near-full" : "random") seed \(batch[j].seed) sector \(batch[j].sector): \(workloadFigures.uniqueTotal) unique states, \(workloadFigures.violationCounts.values.reduce(0, +)) violations", to: &err)
                }
            }
            next &+= UInt64(batch.count)
            if !figures.violations.isEmpty { break }
        }
        let seconds = Date().timeIntervalSince(started)
        let out = Output(seed: seed, mode: long ? "long" : "smoke", workloads: workloads, ops: workloads * opCount, seconds: seconds,
                         statesPerSecond: Double(figures.uniqueTotal) / max(seconds, 0.001), figures: figures,
                         openMillisecondsP50: figures.percentile(0.5), openMillisecondsP99: figures.percentile(0.99),
                         openMillisecondsMax: figures.percentile(1))
        if json {
            try printJSON(out)
        } else {
            printFigures(out)
        }
        if !figures.violations.isEmpty { throw ExitCode(1) }
    }

    /// One workload: its crash states (C0-C5) and, on the same seed, C8/C9 runs with one
    /// write, then one sync, failing at points drawn from the seed (an I/O-error loop
    /// over sampled k).
    private func runWorkload(seed: UInt64, sector: Int, opCount: Int, samples: Int) throws -> CrashFigures {
        let simulator = try CrashWorkloads.random(seed: seed, opCount: opCount, physicalSectorByteCount: sector, samples: samples,
                                                  compoundEvery: compoundEvery)
        var figures = simulator.figures
        figures.merge(try CrashWorkloads.faultRuns(seed: seed, opCount: opCount, perKind: long ? 8 : 2))
        return figures
    }

    /// C10/C11 run from one recovered state in this many (near-full: four times fewer).
    var compoundEvery: Int { long ? 24 : 400 }

    private func printFigures(_ out: Output) {
        let f = out.figures
        func count(_ dictionary: [String: Int]) -> String {
            CrashClass.allCases.map { "\($0.rawValue) \(dictionary[$0.rawValue] ?? 0)" }.joined(separator: "  ")
        }
        var lines = [
            "crashsim v1 seed=\(out.seed) mode=\(out.mode) geometry=test(8M pool, 4K blocks, 64K segments) sectors=512,4096",
            "workloads \(out.workloads) (3 random : 1 near-full, \(out.ops / max(out.workloads, 1)) ops each)   ops \(out.ops)   crash points \(f.crashPoints)",
            "  C8/C9 fault runs: \(long ? 8 : 2) per fault kind per random workload (EIO write, short write + ENOSPC, ENOSPC from then on, fsync EIO)",
            "states generated \(f.generatedTotal)   unique \(f.uniqueTotal)",
            "  generated: \(count(f.generated))",
            "  unique:    \(count(f.unique))",
            "recovery ok \(f.outcomes["ok"] ?? 0)   corrupt reported (C6/C7) \(f.outcomes["corrupt-reported"] ?? 0)   newest synced batch lost to damage (C6/C7, unprovable) \(f.outcomes["lost-last-synced-batch"] ?? 0)",
            String(format: "  open p50 %.2f ms  p99 %.2f ms  max %.2f ms   replayed records max %d",
                   out.openMillisecondsP50, out.openMillisecondsP99, out.openMillisecondsMax, f.replayedRecordsMax),
            "violations \(f.violationCounts.values.reduce(0, +)): " + ["open", "prefix", "durability", "silent-wrong-data", "generation", "invariants", "verify-before", "verify-after", "idempotence", "fail-stop"]
                .map { "\($0) \(f.violationCounts[$0] ?? 0)" }.joined(separator: "  "),
            "  write-time (W1-W4, \(f.checkedWrites) writes checked): " + ["overwrite-durable", "rewrite-synced-sector", "pointer-before-pointee", "slot"]
                .map { "\($0) \(f.violationCounts[$0] ?? 0)" }.joined(separator: "  "),
            "coverage marks \(CrashFigures.requiredMarks.filter { (f.marks[$0] ?? 0) > 0 }.count)/\(CrashFigures.requiredMarks.count) hit: "
                + f.marks.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: "  "),
            "  never hit: " + CrashFigures.requiredMarks.filter { (f.marks[$0] ?? 0) == 0 }.joined(separator: " "),
            String(format: "time %.0f s   %.0f states/s (budget %.0f s)", out.seconds, out.statesPerSecond, budget),
        ]
        for v in f.violations {
            lines.append("VIOLATION \(v)")
            lines.append("  replay: logpool crashsim --replay \(v.state)")
        }
        print(lines.joined(separator: "\n"))
    }

    private func replayState(_ text: String) throws {
        guard let id = CrashStateID(text), let dash = id.workload.lastIndex(of: "-"),
              let sector = Int(id.workload[id.workload.index(after: dash)...]), sector == 512 || sector == 4096,
              ["random", "near-full"].contains(id.workload[..<dash])
        else { throw PoolError.invalidArgument("not a crash state id: \(text) (expected v1:seed:random-512|random-4096|near-full-512|near-full-4096:point:class:index)") }
        if let fault = CrashWorkloads.Fault(crashClass: id.crashClass, index: id.index) {
            // C8/C9: the workload re-run with its point-th sync or write failing.
            let outcome = try CrashWorkloads.fault(fault, at: id.point, seed: id.seed, opCount: ops ?? 100_000)
            guard outcome.fired else {
                throw PoolError.notFound("crash state \(id): the workload never reached call \(id.point)")
            }
            print("state \(id) (\(fault.rawValue) at call \(id.point)): \(outcome.violations.isEmpty ? "all invariants hold" : "\(outcome.violations.count) violations")")
            for v in outcome.violations { print("VIOLATION \(v)") }
            if !outcome.violations.isEmpty { throw ExitCode(1) }
            return
        }
        guard !id.crashClass.isFault else {
            throw PoolError.invalidArgument("crash state \(id): class \(id.crashClass.rawValue) has no variant \(id.index)")
        }
        var found: [CrashViolation] = []
        let samples = max(3, id.index + 1)
        let simulator = id.workload.hasPrefix("random")
            ? try CrashWorkloads.random(seed: id.seed, opCount: ops ?? 100_000, physicalSectorByteCount: sector,
                                        samples: samples, compoundEvery: compoundEvery, only: id) { found.append($0) }
            : try CrashWorkloads.nearFull(seed: id.seed, steps: ops ?? 100_000, physicalSectorByteCount: sector,
                                          samples: samples, compoundEvery: compoundEvery * 4, only: id) { found.append($0) }
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
        print("state \(id): \(found.isEmpty ? "all invariants hold" : "\(found.count) violations")")
        print("ops before the crash point: \(simulator.opLog.joined(separator: "; "))")
        for v in found { print("VIOLATION [\(v.invariant)] \(v.detail)") }
        print("crash image written to \(imagePath)")
        if !found.isEmpty { throw ExitCode(1) }
    }
}

/// Results of concurrent workloads, each slot written by exactly one worker and read
/// after all have finished.
private final class SharedResults: @unchecked Sendable {
    private let lock = NSLock()
    private var slots: [Result<CrashFigures, any Error>?]
    init(count: Int) { slots = Array(repeating: nil, count: count) }
    func set(_ index: Int, _ value: Result<CrashFigures, any Error>) { lock.withLock { slots[index] = value } }
    var all: [Result<CrashFigures, any Error>] { lock.withLock { slots.compactMap { $0 } } }
}
