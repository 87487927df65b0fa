import ArgumentParser
import Foundation
import LogPool
import LogPoolCLIKit
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// `logpool bench`: the same workloads on a fresh pool and on a plain file with
/// pwrite/pread/fdatasync (the raw baseline), measured in the same run, so the ratios
/// mean something on a shared, noisy machine.
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Measure LogPool against a raw file baseline.")
    @Option(help: "Directory for the pool and baseline files (default: the temporary directory).") var dir: String?
    @Option(help: "GiB written by the sequential workloads.") var gib: Int = 1
    @Option(help: "Compression modes to run: none, lz4 or both.") var compression: String = "both"
    @Option(help: "Sections to run: all, suite (sequential, random, scrub, open), overwrite (a full pool overwritten) or reads (the suite's read rows alone, for profiling).")
    var section: String = "all"
    @Option(help: "MiB of the pools the overwrite section fills.") var overwriteMib: Int = 128
    @Option(help: "Times the overwrite section overwrites the filled blocks.") var passes: Int = 2
    @Flag(help: "Run only the scale section: pools of each --scale-gib size written, overwritten, reopened, crashed and read (several minutes at 16 GiB).")
    var scale = false
    @Option(help: "GiB written in each pool of the scale section, comma separated.") var scaleGib: String = "1,4,16"
    @Flag(help: "One JSON object: {\"suite\": [...], \"overwrite\": [...], \"scale\": [...]}.") var json = false

    struct Report: Encodable {
        var suite: [Row]
        var overwrite: [OverwriteRow]
        var scale: [ScaleRow]
    }

    struct Row: Encodable {
        var compression: String
        var workload: String
        var unit: String
        var logpool: Double
        var raw: Double?
        var ratio: Double?
        var target: String
    }

    func run() throws {
        guard gib >= 1, gib <= 64 else { throw ValidationError("--gib must be 1...64, not \(gib)") }
        let modes: [CompressionMode]
        switch compression {
        case "none": modes = [.none]
        case "lz4": modes = [.lz4]
        case "both": modes = [.none, .lz4]
        default: throw ValidationError("--compression must be none, lz4 or both, not \(compression)")
        }
        guard ["all", "suite", "overwrite", "reads"].contains(section) else {
            throw ValidationError("--section must be all, suite, overwrite or reads, not \(section)")
        }
        guard overwriteMib >= 16, overwriteMib <= 65536 else { throw ValidationError("--overwrite-mib must be 16...65536, not \(overwriteMib)") }
        guard passes >= 1, passes <= 100 else { throw ValidationError("--passes must be 1...100, not \(passes)") }
        let directory = dir ?? NSTemporaryDirectory()
        if scale {
            let sizes = scaleGib.split(separator: ",").map { Int($0.trimmingCharacters(in: .whitespaces)) }
            guard !sizes.isEmpty, sizes.allSatisfy({ $0 != nil && $0! >= 1 && $0! <= 1024 }) else {
                throw ValidationError("--scale-gib must be comma-separated sizes of 1...1024 GiB, not \(scaleGib)")
            }
            let rows = try scaleRows(directory: directory, sizes: sizes.compactMap { $0 })
            if json { return try printJSON(Report(suite: [], overwrite: [], scale: rows)) }
            return try printScaleTable(rows)
        }
        var rows: [Row] = []
        if section != "overwrite" {
            for mode in modes {
                rows += section == "reads" ? try runReads(mode: mode, directory: directory) : try runSuite(mode: mode, directory: directory)
            }
        }
        let overwrite = ["suite", "reads"].contains(section) ? [] : try overwriteRows(directory: directory, poolMiB: overwriteMib, passes: passes)
        if json { return try printJSON(Report(suite: rows, overwrite: overwrite, scale: [])) }
        if !rows.isEmpty {
            var table = [["COMPRESSION", "WORKLOAD", "UNIT", "LOGPOOL", "RAW", "RATIO", "TARGET"]]
            for r in rows {
                table.append([r.compression, r.workload, r.unit, String(format: "%.1f", r.logpool),
                              r.raw.map { String(format: "%.1f", $0) } ?? "-", r.ratio.map { String(format: "%.2f", $0) } ?? "-", r.target])
            }
            try printTable(table)
        }
        if !overwrite.isEmpty {
            if !rows.isEmpty { try out("") }
            try printOverwriteTable(overwrite)
        }
    }

    /// Flushes every dirty page in the system so one phase's writeback does not slow the next.
    func settle() {
        Glibc.sync()
    }

    func now() -> Double { monotonicSeconds() }

    private func peakRSSBytes() -> UInt64 { peakResidentBytes() }

    /// The data a suite writes, 1 MiB repeated.
    enum Dataset {
        /// Random bytes: LZ4 cannot shrink them.
        case random
        /// Application log lines (timestamps, levels, key=value fields with varying
        /// numbers): typical compressible data; LZ4 gets about 2.7x on it.
        case logLines
        /// Words drawn at random from a small vocabulary: a hard case for LZ4 (short
        /// matches everywhere; about 1.7x at roughly half the speed of log lines).
        case wordSalad
    }

    /// 1 MiB of `dataset`, deterministic for `seed`.
    func chunk(_ dataset: Dataset, seed: UInt64) -> [UInt8] {
        var generator = SplitMix(seed: seed)
        var bytes: [UInt8] = []
        bytes.reserveCapacity((1 << 20) + 256)
        switch dataset {
        case .random:
            return (0..<(1 << 20)).map { _ in UInt8(truncatingIfNeeded: generator.next()) }
        case .logLines:
            let levels = ["INFO ", "INFO ", "INFO ", "DEBUG", "WARN ", "ERROR"]
            let operations = ["write", "read", "sync", "snapshot", "discard"]
            var milliseconds: UInt64 = 1_795_000_000_000
            while bytes.count < 1 << 20 {
                milliseconds += generator.next() % 50
                let volume = generator.next() % 24
                let line = "\(milliseconds / 1000).\(String(milliseconds % 1000 + 1000).dropFirst()) "
                    + "\(levels[Int(generator.next() % 6)]) pool=/srv/pools/main.pool volume=vm-\(volume < 10 ? "0" : "")\(volume) "
                    + "op=\(operations[Int(generator.next() % 5)]) offset=\(generator.next() % (1 << 34) & ~4095) "
                    + "length=\(4096 << (generator.next() % 5)) latency_us=\(generator.next() % 2000)\n"
                bytes += Array(line.utf8)
            }
        case .wordSalad:
            let words = ["block", "pool", "snapshot", "clone", "segment", "journal", "checkpoint", "volume", "crash", "safe",
                         "log", "structured", "copy", "on", "write", "the", "a", "of", "and", "data"]
            while bytes.count < 1 << 20 {
                bytes += Array(words[Int(generator.next() % UInt64(words.count))].utf8)
                bytes.append(generator.next() % 9 == 0 ? 10 : 32)
                if generator.next() % 5 == 0 { bytes += Array(String(generator.next() % 100000).utf8) }
            }
        }
        return Array(bytes.prefix(1 << 20))
    }

    /// seq-write-1M: `total` bytes of `data` in 1 MiB writes, one sync at the end. Best of
    /// three, raw and pool runs interleaved, because the shared disk's speed drifts. Every
    /// round starts fresh on both sides: a truncated raw file (`fd`), a new pool file.
    /// Returns the rates and the last round's pool, open, with its volume "seq".
    func seqWrite(data: [UInt8], total: Int, mode: CompressionMode, poolPath: String, fd: Int32) throws
        -> (poolRate: Double, rawRate: Double, pool: Pool, volume: Volume) {
        var poolSeq = 0.0, rawSeq = 0.0
        var pool: Pool? = nil
        var volume: Volume? = nil
        let debug = ProcessInfo.processInfo.environment["LOGPOOL_BENCH_DEBUG"] != nil
        for _ in 0..<3 {
            ftruncate(fd, 0)
            settle()
            var t0 = now()
            for i in 0..<(total >> 20) {
                let n = data.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(i << 20)) }
                guard n == data.count else { throw PoolError.io(errno: errno, operation: "baseline pwrite", byteOffset: UInt64(i) << 20) }
            }
            let rawLoopEnd = now()
            guard fdatasync(fd) == 0 else { throw PoolError.io(errno: errno, operation: "baseline fdatasync", byteOffset: 0) }
            if debug { FileHandle.standardError.write(Data("raw write loop \(rawLoopEnd - t0) s, sync \(now() - rawLoopEnd) s\n".utf8)) }
            rawSeq = max(rawSeq, Double(total) / (now() - t0) / 1e6)
            if let previous = pool {
                try previous.close()
                unlink(poolPath)
            }
            let fresh = try Pool.create(at: poolPath, capacity: UInt64(total) * 2 + (512 << 20), compression: mode)
            pool = fresh
            let seq = try fresh.createVolume(name: "seq", size: UInt64(total))
            volume = seq
            settle()
            t0 = now()
            for i in 0..<(total >> 20) { try seq.write(at: UInt64(i) << 20, from: data) }
            let loopEnd = now()
            try fresh.sync()
            if debug { FileHandle.standardError.write(Data("pool write loop \(loopEnd - t0) s, sync \(now() - loopEnd) s\n".utf8)) }
            poolSeq = max(poolSeq, Double(total) / (now() - t0) / 1e6)
        }
        guard let pool, let volume else { throw PoolError.invalidArgument("no benchmark round ran") }
        return (poolSeq, rawSeq, pool, volume)
    }

    /// Asks the kernel to drop the file's clean cached pages, so the next read comes from
    /// the disk (no root needed, only this file affected).
    private func dropCache(_ path: String) {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { return }
        fdatasync(fd)
        posix_fadvise(fd, 0, 0, Int32(POSIX_FADV_DONTNEED))
        close(fd)
    }

    /// scrub throughput of the closed pool (every live block read and checksummed) against
    /// reading the raw file's bytes with 1 MiB preads, both from a cold cache, best of
    /// two; and the time of a metadata-only verify.
    private func scrubRows(poolPath: String, rawPath: String, rawByteCount: Int, label: String) throws -> [Row] {
        var scrubRate = 0.0, rawRate = 0.0, verifyMs = Double.infinity
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        for _ in 0..<2 {
            dropCache(rawPath)
            let fd = open(rawPath, O_RDONLY)
            guard fd >= 0 else { throw PoolError.io(errno: errno, operation: "open \(rawPath)", byteOffset: 0) }
            var t0 = now()
            for i in 0..<(rawByteCount >> 20) {
                let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 1 << 20, off_t(i << 20)) }
                guard n == 1 << 20 else { close(fd); throw PoolError.io(errno: errno, operation: "baseline pread", byteOffset: UInt64(i) << 20) }
            }
            rawRate = max(rawRate, Double(rawByteCount) / (now() - t0) / 1e6)
            close(fd)
            dropCache(poolPath)
            t0 = now()
            let report = try Pool.verify(at: poolPath, scrubData: true)
            let seconds = now() - t0
            guard report.isClean else { throw PoolError.invalidArgument("scrub of the benchmark pool found \(report.problems)") }
            scrubRate = max(scrubRate, Double(report.scrubbedByteCount) / seconds / 1e6)
            t0 = now()
            _ = try Pool.verify(at: poolPath)
            verifyMs = min(verifyMs, (now() - t0) * 1000)
        }
        return [
            Row(compression: label, workload: "scrub", unit: "MB/s", logpool: scrubRate, raw: rawRate, ratio: scrubRate / rawRate, target: ">= 0.80 (cold cache)"),
            Row(compression: label, workload: "verify", unit: "ms", logpool: verifyMs, raw: nil, ratio: nil, target: "metadata only"),
        ]
    }

    /// seq-read-1M and rand-read-4K of `volume` (written sequentially, `total` bytes)
    /// against preads of the raw file `fd` holding the same bytes. Returns the rows, the
    /// random offsets read and the pool's random-read IOPS (the concurrency rows reuse
    /// both).
    private func readRows(volume: Volume, fd: Int32, total: Int, label: String, mode: CompressionMode,
                          generator: inout SplitMix) throws -> ([Row], [Int], Double) {
        var rows: [Row] = []
        var t0 = now()
        // seq-read-1M (first: it also brings both files into the page cache, so the random
        // reads below compare code, not cache luck; this VM drops clean pages quickly).
        // Best of three, alternating, as for the random reads: one pass over 1 GiB takes
        // about 0.1 s, where a neighbour's burst moves single figures by a third.
        var big = [UInt8](repeating: 0, count: 1 << 20)
        var poolSeqR = 0.0, rawSeqR = 0.0
        for _ in 0..<3 {
            settle()
            t0 = now()
            for i in 0..<(total >> 20) { try big.withUnsafeMutableBytes { try volume.read(at: UInt64(i) << 20, into: $0) } }
            poolSeqR = max(poolSeqR, Double(total) / (now() - t0) / 1e6)
            settle()
            t0 = now()
            for i in 0..<(total >> 20) { _ = big.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 1 << 20, off_t(i << 20)) } }
            rawSeqR = max(rawSeqR, Double(total) / (now() - t0) / 1e6)
        }
        rows.append(Row(compression: label, workload: "seq-read-1M", unit: "MB/s", logpool: poolSeqR, raw: rawSeqR,
                        ratio: poolSeqR / rawSeqR, target: ">= 0.80"))

        // rand-read-4K over the sequentially written volume.
        let reads = 32768
        let readOffsets = (0..<reads).map { _ in Int(generator.next() % UInt64(total / 4096)) * 4096 }
        var buffer = [UInt8](repeating: 0, count: 4096)
        var poolRandR = 0.0, rawRandR = 0.0
        for _ in 0..<3 {  // best of three, alternating, as for seq-write
            settle()
            t0 = now()
            for offset in readOffsets { _ = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 4096, off_t(offset)) } }
            rawRandR = max(rawRandR, Double(reads) / (now() - t0))
            settle()
            t0 = now()
            for offset in readOffsets { try buffer.withUnsafeMutableBytes { try volume.read(at: UInt64(offset), into: $0) } }
            poolRandR = max(poolRandR, Double(reads) / (now() - t0))
        }
        rows.append(Row(compression: label, workload: "rand-read-4K", unit: "IOPS", logpool: poolRandR, raw: rawRandR,
                        ratio: poolRandR / rawRandR, target: mode == .none ? ">= 0.70" : "-"))

        return (rows, readOffsets, poolRandR)
    }

    /// The read rows alone (`--section reads`): a volume written sequentially, then
    /// seq-read-1M, rand-read-4K and (without compression) scrub. For profiling the read
    /// path without the write workloads around it.
    private func runReads(mode: CompressionMode, directory: String) throws -> [Row] {
        let files = try SuiteFiles(directory: directory)
        defer { files.remove() }
        let total = gib << 30
        let (_, _, pool, volume) = try seqWrite(data: chunk(mode == .lz4 ? .logLines : .random, seed: 7), total: total,
                                                mode: mode, poolPath: files.poolPath, fd: files.fd)
        var generator = SplitMix(seed: 42)
        var (rows, _, _) = try readRows(volume: volume, fd: files.fd, total: total, label: mode.description, mode: mode,
                                        generator: &generator)
        try pool.close()
        if mode == .none {
            rows += try scrubRows(poolPath: files.poolPath, rawPath: files.rawPath, rawByteCount: total, label: mode.description)
        }
        return rows
    }

    /// The pool file and the raw baseline file (open) of one suite run.
    private struct SuiteFiles {
        let poolPath: String
        let rawPath: String
        let fd: Int32

        init(directory: String) throws {
            poolPath = directory + "/logpool-bench-\(getpid()).pool"
            rawPath = directory + "/logpool-bench-\(getpid()).raw"
            unlink(poolPath); unlink(rawPath)
            fd = open(rawPath, O_RDWR | O_CREAT | O_TRUNC, 0o644)
            guard fd >= 0 else { throw PoolError.io(errno: errno, operation: "open \(rawPath)", byteOffset: 0) }
        }

        func remove() {
            close(fd)
            unlink(poolPath); unlink(rawPath)
        }
    }

    private func runSuite(mode: CompressionMode, directory: String) throws -> [Row] {
        let label = mode.description
        let files = try SuiteFiles(directory: directory)
        defer { files.remove() }
        let (poolPath, rawPath, fd) = (files.poolPath, files.rawPath, files.fd)
        let total = gib << 30
        let data = chunk(mode == .lz4 ? .logLines : .random, seed: 7)
        var rows: [Row] = []

        let rssBefore = peakRSSBytes()
        let (poolSeq, rawSeq, pool, volume) = try seqWrite(data: data, total: total, mode: mode, poolPath: poolPath, fd: fd)
        // Process-wide peak resident memory (it only grows), per GiB held in the pool.
        _ = rssBefore
        let rssPerGiB = Double(peakRSSBytes()) / Double(gib) / 1048576
        rows.append(Row(compression: label, workload: "seq-write-1M", unit: "MB/s", logpool: poolSeq, raw: rawSeq,
                        ratio: poolSeq / rawSeq, target: mode == .none ? ">= 0.80" : ">= 0.70"))
        var t0 = now()
        if mode == .lz4 {
            let info = try volume.info()
            let ratio = Double(info.mappedBytes) / Double(max(info.allocatedBytes, 1))
            rows.append(Row(compression: label, workload: "compression-ratio", unit: "x", logpool: ratio, raw: nil, ratio: nil, target: "-"))
        }

        // rand-write-4K over 256 MiB, sync every 32.
        let randomSpan = 256 << 20
        let randomVolume = try pool.createVolume(name: "rand", size: UInt64(randomSpan))
        try randomVolume.write(at: 0, from: [0])  // not a fill: blocks appear as written
        let writes = 16384
        var generator = SplitMix(seed: 42)
        let offsets = (0..<writes).map { _ in Int(generator.next() % UInt64(randomSpan / 4096)) * 4096 }
        let block = Array(data[0..<4096])
        settle()
        t0 = now()
        for (i, offset) in offsets.enumerated() {
            try randomVolume.write(at: UInt64(offset), from: block)
            if i % 32 == 31 { try pool.sync() }
        }
        let poolRandW = Double(writes) / (now() - t0)
        let rfd = open(rawPath + ".r", O_RDWR | O_CREAT | O_TRUNC, 0o644)
        guard rfd >= 0 else { throw PoolError.io(errno: errno, operation: "open \(rawPath).r", byteOffset: 0) }
        defer { close(rfd); unlink(rawPath + ".r") }
        ftruncate(rfd, off_t(randomSpan))
        // Allocate the baseline file for real, as a written volume would be.
        for i in 0..<(randomSpan >> 20) { _ = data.withUnsafeBytes { pwrite(rfd, $0.baseAddress, $0.count, off_t(i << 20)) } }
        fdatasync(rfd)
        settle()
        t0 = now()
        for (i, offset) in offsets.enumerated() {
            _ = block.withUnsafeBytes { pwrite(rfd, $0.baseAddress, 4096, off_t(offset)) }
            if i % 32 == 31 { fdatasync(rfd) }
        }
        let rawRandW = Double(writes) / (now() - t0)
        rows.append(Row(compression: label, workload: "rand-write-4K", unit: "IOPS", logpool: poolRandW, raw: rawRandW,
                        ratio: poolRandW / rawRandW, target: mode == .none ? ">= 1.20" : "-"))
        // The physical limit of a log-structured writer: the same number of 4 KiB writes
        // appended to a plain file, fdatasync every 32. LogPool turns random writes into
        // appends, so this is the figure its random writes can approach.
        let afd = open(rawPath + ".log", O_RDWR | O_CREAT | O_TRUNC, 0o644)
        guard afd >= 0 else { throw PoolError.io(errno: errno, operation: "open \(rawPath).log", byteOffset: 0) }
        defer { close(afd); unlink(rawPath + ".log") }
        settle()
        t0 = now()
        for i in 0..<writes {
            _ = block.withUnsafeBytes { pwrite(afd, $0.baseAddress, 4096, off_t(i) * 4096) }
            if i % 32 == 31 { fdatasync(afd) }
        }
        let appendIOPS = Double(writes) / (now() - t0)
        rows.append(Row(compression: label, workload: "rand-write-4K-vs-log-append", unit: "IOPS", logpool: poolRandW, raw: appendIOPS,
                        ratio: poolRandW / appendIOPS, target: ">= 0.80 (raw: 4K appends, fdatasync/32)"))

        let (readRowsMeasured, readOffsets, poolRandR) = try readRows(volume: volume, fd: fd, total: total, label: label, mode: mode, generator: &generator)
        rows += readRowsMeasured

        rows += try concurrencyRows(pool: pool, volume: volume, readOffsets: readOffsets, oneThreadIOPS: poolRandR, label: label, directory: directory)

        // snapshot of the fully written volume; baseline: copying the raw file.
        var big = [UInt8](repeating: 0, count: 1 << 20)
        settle()
        t0 = now()
        try pool.snapshot(source: "seq", name: "seq@1")
        try pool.sync()
        let snapMs = (now() - t0) * 1000
        settle()
        t0 = now()
        let copy = open(rawPath + ".copy", O_RDWR | O_CREAT | O_TRUNC, 0o644)
        guard copy >= 0 else { throw PoolError.io(errno: errno, operation: "open \(rawPath).copy", byteOffset: 0) }
        for i in 0..<(total >> 20) {
            _ = big.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 1 << 20, off_t(i << 20)) }
            _ = big.withUnsafeBytes { pwrite(copy, $0.baseAddress, 1 << 20, off_t(i << 20)) }
        }
        fdatasync(copy)
        close(copy)
        unlink(rawPath + ".copy")
        let copyMs = (now() - t0) * 1000
        rows.append(Row(compression: label, workload: "snapshot", unit: "ms", logpool: snapMs, raw: copyMs,
                        ratio: snapMs / copyMs, target: "<= 10 ms"))

        // open after clean close.
        try pool.close()
        if mode == .none { rows += try scrubRows(poolPath: poolPath, rawPath: rawPath, rawByteCount: total, label: label) }
        settle()
        t0 = now()
        let reopened = try Pool.open(at: poolPath)
        let openClean = (now() - t0) * 1000
        rows.append(Row(compression: label, workload: "open-clean", unit: "ms", logpool: openClean, raw: nil, ratio: nil, target: "<= 100 ms"))

        // open after a crash with a full journal: synced small writes until the journal is
        // about to checkpoint, then drop the handle without close (no checkpoint).
        let crashVolume = try reopened.openVolume(name: "rand")
        let journalBytes = reopened.stats.journalBytes
        var written = 0
        while UInt64(written) * 100 < journalBytes * 45 / 100 {
            try crashVolume.write(at: UInt64(offsets[written % offsets.count]), from: block)
            if written % 32 == 31 { try reopened.sync() }
            written += 1
        }
        try reopened.sync()
        let generation = reopened.stats.generation
        try reopened.abandonForBenchmark()
        settle()
        t0 = now()
        let recovered = try Pool.open(at: poolPath)
        let openCrash = (now() - t0) * 1000
        let replayed = recovered.recoveryReport.replayedRecordCount
        try recovered.close()
        rows.append(Row(compression: label, workload: "open-after-crash", unit: "ms", logpool: openCrash, raw: nil, ratio: nil,
                        target: "<= 150 ms (\(replayed) records replayed, gen \(generation))"))
        rows.append(Row(compression: label, workload: "peak-rss-per-GiB", unit: "MiB", logpool: rssPerGiB, raw: nil, ratio: nil, target: "-"))

        // The hard case for LZ4, reported beside the typical one.
        if mode == .lz4 {
            let saladPath = poolPath + ".salad"
            defer { unlink(saladPath) }
            let salad = try seqWrite(data: chunk(.wordSalad, seed: 7), total: total, mode: mode, poolPath: saladPath, fd: fd)
            let info = try salad.volume.info()
            let ratio = Double(info.mappedBytes) / Double(max(info.allocatedBytes, 1))
            try salad.pool.close()
            rows.append(Row(compression: label, workload: "seq-write-1M-words", unit: "MB/s", logpool: salad.poolRate, raw: salad.rawRate,
                            ratio: salad.poolRate / salad.rawRate, target: String(format: "- (word salad, %.1fx)", ratio)))
        }

        // Usable space: fill a fresh 1 GiB pool with incompressible data until poolFull.
        if mode == .none {
            let fillPath = poolPath + ".fill"
            unlink(fillPath)
            defer { unlink(fillPath) }
            let fill = try Pool.create(at: fillPath, capacity: 1 << 30, compression: .none)
            let big = try fill.createVolume(name: "fill", size: 2 << 30)
            var filled: UInt64 = 0
            do {
                while true {
                    try big.write(at: filled, from: data)
                    filled += UInt64(data.count)
                }
            } catch PoolError.poolFull {}
            try fill.close()
            rows.append(Row(compression: label, workload: "usable-of-1GiB-pool", unit: "%", logpool: Double(filled) / Double(1 << 30) * 100,
                            raw: nil, ratio: nil, target: ">= 90 (overhead < 10%)"))
        }
        return rows
    }
}

extension Bench {
    /// Reads from two threads against one (the same offsets split in two), and read
    /// latency while another thread writes with a sync every 32 writes against read
    /// latency alone (Specs/COMMIT.md §7: reads run outside the lock and never wait for
    /// an fsync).
    func concurrencyRows(pool: Pool, volume: Volume, readOffsets: [Int], oneThreadIOPS: Double, label: String, directory: String) throws -> [Row] {
        var rows: [Row] = []
        let halves = [Array(readOffsets[0..<(readOffsets.count / 2)]), Array(readOffsets[(readOffsets.count / 2)...])]
        var twoThreads = 0.0
        for _ in 0..<3 {
            settle()
            let group = DispatchGroup()
            let t0 = now()
            for half in halves {
                group.enter()
                Thread {
                    var buffer = [UInt8](repeating: 0, count: 4096)
                    for offset in half { try? buffer.withUnsafeMutableBytes { try volume.read(at: UInt64(offset), into: $0) } }
                    group.leave()
                }.start()
            }
            group.wait()
            twoThreads = max(twoThreads, Double(readOffsets.count) / (now() - t0))
        }
        rows.append(Row(compression: label, workload: "rand-read-4K-2-threads", unit: "IOPS", logpool: twoThreads, raw: oneThreadIOPS,
                        ratio: twoThreads / oneThreadIOPS, target: ">= 1.6 (vs 1 thread)"))

        // p99 of 4 KiB reads, alone and while a writer syncs every 32 writes.
        let written = try pool.createVolume(name: "bench-writer", size: 64 << 20)
        func readLatencies() -> [Double] {
            var buffer = [UInt8](repeating: 0, count: 4096)
            var latencies: [Double] = []
            latencies.reserveCapacity(8192)
            for offset in readOffsets.prefix(8192) {
                let t0 = now()
                try? buffer.withUnsafeMutableBytes { try volume.read(at: UInt64(offset), into: $0) }
                latencies.append(now() - t0)
            }
            return latencies.sorted()
        }
        /// Read latencies while `writeOne` runs on another thread, with `syncAll` after
        /// every 32 calls.
        func latencies(whileWriting writeOne: @escaping @Sendable (UInt64) -> Void, sync syncAll: @escaping @Sendable () -> Void) -> [Double] {
            let stop = Mutex(false)
            let writerDone = DispatchSemaphore(value: 0)
            Thread {
                var generator = SplitMix(seed: 99)
                var count = 0
                while !stop.withLock({ $0 }) {
                    writeOne(UInt64(generator.next() % UInt64((64 << 20) / 4096)) * 4096)
                    count += 1
                    if count % 32 == 0 { syncAll() }
                }
                writerDone.signal()
            }.start()
            let busy = readLatencies()
            stop.withLock { $0 = true }
            writerDone.wait()
            return busy
        }
        settle()
        let alone = readLatencies()
        let block = [UInt8](repeating: 0x5a, count: 4096)
        let busy = latencies(whileWriting: { offset in try? written.write(at: offset, from: block) },
                             sync: { try? pool.sync() })
        // The same writer without its syncs: what the writes' turns under the lock cost
        // readers, so that the difference from `busy` is what the fsyncs cost them.
        settle()
        let busyNoSync = latencies(whileWriting: { offset in try? written.write(at: offset, from: block) }, sync: {})
        try pool.delete(name: "bench-writer")
        // The floor: the same writer on a plain file (no lock shared with the reader), so
        // what remains is the machine (two cores, the kernel's writeback), not LogPool.
        let filePath = directory + "/logpool-bench-\(getpid()).writer"
        let fileFD = open(filePath, O_RDWR | O_CREAT | O_TRUNC, 0o644)
        guard fileFD >= 0 else { throw PoolError.io(errno: errno, operation: "open \(filePath)", byteOffset: 0) }
        defer { close(fileFD); unlink(filePath) }
        settle()
        let fileBusy = latencies(whileWriting: { offset in
            _ = block.withUnsafeBytes { pwrite(fileFD, $0.baseAddress, 4096, off_t(offset)) }
        }, sync: { fdatasync(fileFD) })
        func p99(_ sorted: [Double]) -> Double { sorted[min(sorted.count - 1, sorted.count * 99 / 100)] * 1_000_000 }
        rows.append(Row(compression: label, workload: "read-p99-during-syncs", unit: "us", logpool: p99(busy), raw: p99(alone),
                        ratio: p99(busy) / p99(alone), target: "<= 2 (vs no writer)"))
        rows.append(Row(compression: label, workload: "read-p99-during-writes-no-sync", unit: "us", logpool: p99(busyNoSync), raw: p99(alone),
                        ratio: p99(busyNoSync) / p99(alone), target: "the writes alone (vs no writer)"))
        rows.append(Row(compression: label, workload: "read-p99-during-file-syncs", unit: "us", logpool: p99(fileBusy), raw: p99(alone),
                        ratio: p99(fileBusy) / p99(alone), target: "floor: the writer on a plain file"))
        return rows
    }
}

struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
