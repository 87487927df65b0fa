import ArgumentParser
import Foundation
import LogPool
import LogPoolCLIKit

#if canImport(Glibc)
import Glibc
#endif

/// One row of the scale section (`logpool bench --scale`): a figure measured on a pool
/// with `gib` GiB written, next to its target.
struct ScaleRow: Encodable {
    var gib: Int
    var workload: String
    var unit: String
    var value: Double
    var target: String
}

/// What `logpool bench-probe` prints: measured in a process of its own, so its peak RSS
/// and its open time are the pool's, not the benchmark's.
struct ProbeResult: Codable {
    var openMilliseconds: Double
    var rssAfterOpenBytes: UInt64
    var coldReadIOPS: Double
    var warmReadIOPS: Double
    var peakRSSBytes: UInt64
    var replayedRecordCount: Int
    var cleanlyClosed: Bool
}

/// The child of the scale benchmark: opens the pool, optionally reads random 4 KiB
/// blocks of a volume (the first `coldReads` right after open, then `reads` more), closes
/// it, and prints a ``ProbeResult`` as JSON.
struct BenchProbe: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "bench-probe", abstract: "Benchmark helper: open a pool in a fresh process and measure it.", shouldDisplay: false)
    @Argument var pool: String
    @Option var volume: String = "v"
    @Option var coldReads: Int = 0
    @Option var reads: Int = 0
    @Option var seed: UInt64 = 1
    @Option(help: "Passes of 1 MiB sequential reads over the whole volume (for profiling).") var sequentialPasses: Int = 0
    @Option(help: "Random 4 KiB writes (sync every 32) before dropping the pool without closing it, as a crash would (for profiling recovery).")
    var crashAfterWrites: Int = 0

    func run() throws {
        guard coldReads >= 0, reads >= 0, coldReads <= 10_000_000, reads <= 10_000_000 else {
            throw ValidationError("--cold-reads and --reads must be 0...10000000")
        }
        let t0 = monotonicSeconds()
        let opened = try Pool.open(at: pool)
        let openMilliseconds = (monotonicSeconds() - t0) * 1000
        let rssAfterOpen = peakResidentBytes()
        var cold = 0.0, warm = 0.0
        if coldReads + reads > 0 {
            let v = try opened.openVolume(name: volume)
            let blocks = v.size / 4096
            guard blocks > 0 else { throw ValidationError("volume \(volume) is empty") }
            var generator = SplitMix(seed: seed)
            var buffer = [UInt8](repeating: 0, count: 4096)
            func run(_ count: Int) throws -> Double {
                guard count > 0 else { return 0 }
                let start = monotonicSeconds()
                for _ in 0..<count {
                    let offset = (generator.next() % blocks) * 4096
                    try buffer.withUnsafeMutableBytes { try v.read(at: offset, into: $0) }
                }
                return Double(count) / (monotonicSeconds() - start)
            }
            cold = try run(coldReads)
            warm = try run(reads)
        }
        if sequentialPasses > 0 {
            let v = try opened.openVolume(name: volume)
            var big = [UInt8](repeating: 0, count: 1 << 20)
            let start = monotonicSeconds()
            for _ in 0..<min(sequentialPasses, 1000) {
                for i in 0..<(v.size >> 20) { try big.withUnsafeMutableBytes { try v.read(at: i << 20, into: $0) } }
            }
            FileHandle.standardError.write(Data("sequential: \(Double(v.size) * Double(min(sequentialPasses, 1000)) / (monotonicSeconds() - start) / 1e6) MB/s\n".utf8))
        }
        if crashAfterWrites > 0 {
            let v = try opened.openVolume(name: volume)
            let blocks = v.size / 4096
            guard blocks > 0 else { throw ValidationError("volume \(volume) is empty") }
            var generator = SplitMix(seed: seed)
            let block = [UInt8](repeating: 0xA5, count: 4096)
            for k in 0..<min(crashAfterWrites, 10_000_000) {
                try v.write(at: (generator.next() % blocks) * 4096, from: block)
                if k % 32 == 31 { try opened.sync() }
            }
            try opened.sync()
            try opened.abandonForBenchmark()
            return
        }
        let report = opened.recoveryReport
        let clean = opened.stats.cleanlyClosed
        try opened.close()
        let result = ProbeResult(openMilliseconds: openMilliseconds, rssAfterOpenBytes: rssAfterOpen, coldReadIOPS: cold,
                                 warmReadIOPS: warm, peakRSSBytes: peakResidentBytes(),
                                 replayedRecordCount: report.replayedRecordCount, cleanlyClosed: clean)
        try printJSON(result)
    }
}

func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// This process's peak resident set size so far: `VmHWM` of /proc/self/status, the
/// high-water mark of this program's own address space. `ru_maxrss` is not that: Linux
/// carries the spawning process's high-water mark across `execve` when the child was
/// started with a shared address space (posix_spawn's vfork), so a probe spawned by a
/// bench that had just written 16 GiB reported the bench's RSS (257 MiB) instead of its
/// own (about 30 MiB). Falls back to `ru_maxrss` where /proc is missing. (/proc files
/// report size 0, so they are read to their end, not by their size.)
func peakResidentBytes() -> UInt64 {
    if let handle = FileHandle(forReadingAtPath: "/proc/self/status"),
       let data = try? handle.readToEnd(), let status = String(data: data, encoding: .utf8),
       let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") }),
       let kib = UInt64(line.dropFirst("VmHWM:".count).split(whereSeparator: { $0 == " " || $0 == "\t" }).first ?? "") {
        return kib * 1024
    }
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    return UInt64(usage.ru_maxrss) * 1024
}

extension Bench {
    /// Runs `logpool bench-probe` on `poolPath` and decodes what it prints.
    func probe(_ poolPath: String, volume: String = "v", coldReads: Int = 0, reads: Int = 0) throws -> ProbeResult {
        let executable = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = ["bench-probe", poolPath, "--volume", volume, "--cold-reads", "\(coldReads)", "--reads", "\(reads)"]
        let pipe = Pipe()
        process.standardOutput = pipe
        try process.run()
        let output = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw PoolError.invalidArgument("bench-probe on \(poolPath) exited with status \(process.terminationStatus)")
        }
        do {
            return try JSONDecoder().decode(ProbeResult.self, from: output)
        } catch {
            throw PoolError.invalidArgument("bench-probe printed something that is not its result: \(error)")
        }
    }

    /// The scale section (issue 11): for each size, a pool written sequentially in 1 MiB
    /// writes, then 10% of it overwritten with random 4 KiB writes (sync every 32), with a
    /// snapshot after every GiB of either; then open times, peak RSS, checkpoint time and
    /// random reads measured in fresh processes. Plus write IOPS with 1 and with 1,000
    /// snapshots on a pool of its own.
    func scaleRows(directory: String, sizes: [Int]) throws -> [ScaleRow] {
        var rows: [ScaleRow] = []
        let poolPath = directory + "/logpool-bench-scale-\(getpid()).pool"
        defer { unlink(poolPath) }
        var data = [UInt8](repeating: 0, count: 1 << 20)
        var generator = SplitMix(seed: 11)
        data.withUnsafeMutableBytes { raw in
            for i in stride(from: 0, to: raw.count, by: 8) { raw.storeBytes(of: generator.next(), toByteOffset: i, as: UInt64.self) }
        }
        for gib in sizes {
            unlink(poolPath)
            let total = UInt64(gib) << 30
            let pool = try Pool.create(at: poolPath, capacity: total + total / 2 + (512 << 20), compression: .none)
            let v = try pool.createVolume(name: "v", size: total)
            var snapshots = 0
            for i in 0..<Int(total >> 20) {
                data.withUnsafeMutableBytes { $0.storeBytes(of: UInt64(i), toByteOffset: 0, as: UInt64.self) }
                try v.write(at: UInt64(i) << 20, from: data)
                if i % 1024 == 1023 {
                    try pool.snapshot(source: "v", name: "v@\(snapshots)")
                    snapshots += 1
                }
            }
            try pool.sync()
            let overwrites = Int(total / 10 / 4096)
            let block = Array(data[0..<4096])
            let blocks = total / 4096
            var t0 = monotonicSeconds()
            for k in 0..<overwrites {
                try v.write(at: (generator.next() % blocks) * 4096, from: block)
                if k % 32 == 31 { try pool.sync() }
                if k % 262_144 == 262_143 {
                    try pool.snapshot(source: "v", name: "v@\(snapshots)")
                    snapshots += 1
                }
            }
            try pool.sync()
            let overwriteIOPS = Double(overwrites) / (monotonicSeconds() - t0)
            t0 = monotonicSeconds()
            try pool.checkpoint()
            let checkpointMs = (monotonicSeconds() - t0) * 1000
            try pool.close()
            settle()
            let written = Double(total + UInt64(overwrites) * 4096) / Double(1 << 30)

            // Open after a clean close: median of three fresh processes.
            var opens: [ProbeResult] = []
            for _ in 0..<3 { opens.append(try probe(poolPath)) }
            opens.sort { $0.openMilliseconds < $1.openMilliseconds }
            let open = opens[1]
            let reads = try probe(poolPath, coldReads: 2000, reads: 20000)

            // Open after a crash with the most replay a crash can leave: the journal
            // nearly full (a checkpoint starts at 3/4 of the ring) or nearly the records
            // after which a checkpoint starts (COMMIT §3), whichever comes first.
            let crashing = try Pool.open(at: poolPath)
            let cv = try crashing.openVolume(name: "v")
            var k = 0
            while k < 4_000_000 {
                try cv.write(at: (generator.next() % blocks) * 4096, from: block)
                k += 1
                if k % 32 == 0 {
                    try crashing.sync()
                    let s = crashing.stats
                    // Also the dirty leaves' bound: past it the next write checkpoints, so
                    // without this the loop never stops on a pool of 16 GiB or more.
                    if s.journalUsedBytes >= s.journalBytes * 7 / 10 || s.journalRecords >= s.journalRecordBound - 64
                        || s.dirtyLeaves >= s.dirtyLeafBound - min(64, s.dirtyLeafBound / 4) { break }
                }
            }
            try crashing.sync()
            let journalFill = Double(crashing.stats.journalUsedBytes) / Double(crashing.stats.journalBytes) * 100
            try crashing.abandonForBenchmark()
            settle()
            let crash = try probe(poolPath)

            let mib = 1048576.0
            rows += [
                ScaleRow(gib: gib, workload: "written", unit: "GiB", value: written, target: "\(snapshots) snapshots"),
                ScaleRow(gib: gib, workload: "overwrite-4K-sync-32", unit: "IOPS", value: overwriteIOPS, target: "-"),
                ScaleRow(gib: gib, workload: "checkpoint-after-overwrites", unit: "ms", value: checkpointMs, target: "-"),
                ScaleRow(gib: gib, workload: "open-clean", unit: "ms", value: open.openMilliseconds, target: "<= 50"),
                ScaleRow(gib: gib, workload: "open-after-crash", unit: "ms", value: crash.openMilliseconds,
                         target: "<= 150 (\(crash.replayedRecordCount) records, journal \(String(format: "%.0f", journalFill))% full)"),
                ScaleRow(gib: gib, workload: "peak-rss-open", unit: "MiB", value: Double(open.peakRSSBytes) / mib, target: "<= cache + 64"),
                ScaleRow(gib: gib, workload: "peak-rss-random-reads", unit: "MiB", value: Double(reads.peakRSSBytes) / mib, target: "<= cache + 64"),
                ScaleRow(gib: gib, workload: "rss-per-GiB-written", unit: "MiB", value: Double(reads.peakRSSBytes) / mib / written, target: "-"),
                ScaleRow(gib: gib, workload: "rand-read-4K-cold-metadata", unit: "IOPS", value: reads.coldReadIOPS, target: "-"),
                ScaleRow(gib: gib, workload: "rand-read-4K-warm-metadata", unit: "IOPS", value: reads.warmReadIOPS, target: "-"),
            ]
            unlink(poolPath)
        }
        if let first = rows.first(where: { $0.workload == "open-clean" }), let last = rows.last(where: { $0.workload == "open-clean" }), first.gib != last.gib {
            rows.append(ScaleRow(gib: last.gib, workload: "open-clean-growth", unit: "x", value: last.value / first.value,
                                 target: "<= 1.5 (open \(last.gib) GiB / open \(first.gib) GiB)"))
        }
        rows += try snapshotCountRows(poolPath: poolPath, data: data)
        return rows
    }

    /// Random 4 KiB write IOPS (sync every 32) on a 256 MiB volume right after its first
    /// snapshot, and again right after its 1,000th: write cost must not grow with the
    /// number of snapshots.
    func snapshotCountRows(poolPath: String, data: [UInt8]) throws -> [ScaleRow] {
        unlink(poolPath)
        defer { unlink(poolPath) }
        let pool = try Pool.create(at: poolPath, capacity: 2 << 30, compression: .none)
        let span: UInt64 = 256 << 20
        let w = try pool.createVolume(name: "w", size: span)
        for i in 0..<Int(span >> 20) { try w.write(at: UInt64(i) << 20, from: data) }
        try pool.sync()
        var generator = SplitMix(seed: 5)
        let block = Array(data[0..<4096])
        func measure() throws -> Double {
            let writes = 8192
            settle()
            let t0 = monotonicSeconds()
            for k in 0..<writes {
                try w.write(at: (generator.next() % (span / 4096)) * 4096, from: block)
                if k % 32 == 31 { try pool.sync() }
            }
            return Double(writes) / (monotonicSeconds() - t0)
        }
        try pool.snapshot(source: "w", name: "w@0")
        let one = try measure()
        for i in 1..<1000 { try pool.snapshot(source: "w", name: "w@\(i)") }
        let thousand = try measure()
        try pool.close()
        return [
            ScaleRow(gib: 0, workload: "write-4K-1-snapshot", unit: "IOPS", value: one, target: "-"),
            ScaleRow(gib: 0, workload: "write-4K-1000-snapshots", unit: "IOPS", value: thousand,
                     target: String(format: ">= 0.9x 1 snapshot (%.2fx)", thousand / one)),
        ]
    }

    func printScaleTable(_ rows: [ScaleRow]) throws {
        var table = [["GIB", "WORKLOAD", "UNIT", "VALUE", "TARGET"]]
        for r in rows {
            table.append([r.gib == 0 ? "-" : "\(r.gib)", r.workload, r.unit, String(format: "%.1f", r.value), r.target])
        }
        try printTable(table)
    }
}
