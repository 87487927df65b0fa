import ArgumentParser
import Foundation
import LogPool
import LogPoolCLIKit

struct Init: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Create a new pool file.")
    @Argument(help: "Path of the pool file to create (it must not exist).") var pool: String
    @Option(parsing: .unconditional, help: "Pool file size (at least 4M).", transform: ByteSize.argument) var size: ByteSize
    @Option(parsing: .unconditional, help: "Block size: unit of addressing and copy-on-write (a power of two, 512 to 64K; default: 4K).",
            transform: ByteSize.argument)
    var blockSize = ByteSize(4096)
    @Option(parsing: .unconditional,
            help: "Segment size: unit of allocation and compaction (a power of two, 64K to 256M; default: 1/64 of the pool, 64K to 4M).",
            transform: ByteSize.argument)
    var segmentSize: ByteSize?
    @Option(help: "Block compression.") var compression: CompressionArgument = .lz4

    func run() throws {
        guard blockSize.bytes <= UInt64(Int32.max), (segmentSize?.bytes ?? 0) <= UInt64(Int32.max) else {
            throw PoolError.invalidArgument("block or segment size is too large")
        }
        let created = try Pool.create(at: pool, capacity: size.bytes, blockSize: Int(blockSize.bytes),
                                      segmentSize: segmentSize.map { Int($0.bytes) }, compression: compression.mode)
        let stats = created.stats
        try created.close()
        try out("created \(oneLine(pool)): \(formatBytes(stats.capacityBytes)), block \(stats.blockSize), segment \(stats.segmentSize), compression \(stats.compression), \(formatBytes(stats.freeBytes)) free")
    }
}

/// `--salvage` for the commands that only read: a pool whose synced journal is damaged
/// (FORMAT J-7) is refused unless the operator asks to read what precedes the damage.
struct SalvageOption: ParsableArguments {
    @Flag(help: "Read a pool whose synced journal is damaged as it was before the damage, and say on stderr which synced changes are lost (read-only: the pool file is not changed).")
    var salvage = false
}

/// Opens `path` read-only; with `--salvage`, accepting synced journal damage and saying
/// on stderr what that loses.
func openForReading(_ path: String, _ options: SalvageOption) throws -> Pool {
    if let served = ServedPool.current { return served }
    let opened: Pool
    do {
        opened = try Pool.open(at: path, mode: .readOnly, acceptJournalLoss: options.salvage)
    } catch PoolError.inUse(let why) {
        try ControlClient.forward(poolPath: path, refusal: why)
    }
    if opened.recoveryReport.syncedJournalDamage {
        var err = StandardError()
        print("logpool: warning: salvaging \(oneLine(path)): \(oneLine(opened.recoveryReport.syncedJournalLoss ?? "synced journal records are lost")); showing the pool as it was before them", to: &err)
    }
    return opened
}

/// Closes a pool `openForReading` returned, unless it is the served one (a command run
/// through the control socket of `logpool serve`).
func release(_ pool: Pool) {
    if pool !== ServedPool.current { try? pool.close() }
}

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show pool geometry and space figures.")
    @Argument(help: "Path of the pool file.") var pool: String
    @Flag(help: "One JSON object.") var json = false
    @OptionGroup var salvage: SalvageOption

    struct Output: Encodable {
        var stats: PoolStats
        var chosenSuperblockSlot: String
        var otherSlotProblem: String?
        var replayedRecordCount: Int
        var replayStopReason: String
        var findings: [String]

        func encode(to encoder: Encoder) throws {
            try stats.encode(to: encoder)
            enum Keys: String, CodingKey { case chosenSuperblockSlot, otherSlotProblem, replayedRecordCount, replayStopReason, findings }
            var c = encoder.container(keyedBy: Keys.self)
            try c.encode(chosenSuperblockSlot, forKey: .chosenSuperblockSlot)
            try c.encode(otherSlotProblem, forKey: .otherSlotProblem)
            try c.encode(replayedRecordCount, forKey: .replayedRecordCount)
            try c.encode(replayStopReason, forKey: .replayStopReason)
            try c.encode(findings, forKey: .findings)
        }
    }

    func run() throws {
        let opened = try openForReading(pool, salvage)
        defer { release(opened) }
        let s = opened.stats
        let report = opened.recoveryReport
        let output = Output(stats: s, chosenSuperblockSlot: report.chosenSlot == 0 ? "A" : "B",
                         otherSlotProblem: report.otherSlotProblem, replayedRecordCount: report.replayedRecordCount,
                         replayStopReason: report.replayStopReason, findings: report.findings)
        if json { return try printJSON(output) }
        var rows = [
            ["capacity", formatBytes(s.capacityBytes)],
            ["used", formatBytes(s.usedBytes)],
            ["dead (reclaimable)", formatBytes(s.deadBytes)],
            ["  freed by the next checkpoint", formatBytes(s.deadAtCheckpointBytes)],
            ["free (dead space included)", formatBytes(s.freeBytes)],
            ["unwritten", formatBytes(s.unwrittenBytes)],
            ["reserve", formatBytes(s.reserveBytes)],
            ["overhead", formatBytes(s.overheadBytes)],
            ["volumes", "\(s.volumeCount)"],
            ["snapshots", "\(s.snapshotCount)"],
            ["deleted, still releasing", "\(s.deletedMapsReleasing) (freed after writes, or now by compact)"],
            ["block size", "\(s.blockSize)"],
            ["segment size", "\(s.segmentSize) x \(s.segmentCount) (\(s.freeSegmentCount) free)"],
            ["journal", formatBytes(s.journalBytes)],
            ["compression", s.compression],
            ["atomic write unit", formatBytes(UInt64(s.atomicWriteBytes))],
            ["cleanly closed", s.cleanlyClosed ? "yes" : "no"],
            ["superblock", "slot \(output.chosenSuperblockSlot), generation \(s.generation)"],
        ]
        if let problem = report.otherSlotProblem { rows.append(["warning", oneLine(problem)]) }
        try printTable(rows)
        if report.replayedRecordCount > 0 { try out("recovery: replayed \(report.replayedRecordCount) journal records; stopped: \(oneLine(report.replayStopReason))") }
        for finding in report.findings { try out("finding: \(oneLine(finding))") }
    }
}

struct Create: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Create a new empty volume.")
    @Argument(help: "Path of the pool file.") var pool: String
    @Argument(help: "Name of the new volume (1-255 bytes of UTF-8; no \"/\", control or invisible characters; not \".\" or \"..\").") var name: String
    @Option(parsing: .unconditional, help: "Volume size (a multiple of the block size).", transform: ByteSize.argument) var size: ByteSize

    func run() throws {
        try withWritablePool(pool) { try $0.createVolume(name: name, size: size.bytes) }
    }
}

struct List: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List volumes and snapshots with space figures.")
    @Argument(help: "Path of the pool file.") var pool: String
    @Flag(help: "A JSON array.") var json = false
    @OptionGroup var salvage: SalvageOption

    func run() throws {
        let opened = try openForReading(pool, salvage)
        defer { release(opened) }
        let rows = try opened.list()
        if json { return try printJSON(rows.map(VolumeRow.init)) }
        try printVolumeTable(rows)
    }
}

struct Snapshot: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Create an immutable snapshot of a volume or snapshot.")
    @Argument(help: "Path of the pool file.") var pool: String
    @Argument(help: "The volume or snapshot to capture.") var source: String
    @Argument(help: "Name of the new snapshot.") var name: String

    func run() throws {
        try withWritablePool(pool) { try $0.snapshot(source: source, name: name) }
    }
}

struct Clone: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Create a writable clone of a volume or snapshot.")
    @Argument(help: "Path of the pool file.") var pool: String
    @Argument(help: "The volume or snapshot to branch from.") var source: String
    @Argument(help: "Name of the new writable volume.") var name: String

    func run() throws {
        try withWritablePool(pool) { try $0.clone(source: source, name: name) }
    }
}

struct Destroy: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Delete a volume or snapshot.")
    @Argument(help: "Path of the pool file.") var pool: String
    @Argument(help: "The volume or snapshot to delete.") var name: String

    func run() throws {
        try withWritablePool(pool) { try $0.delete(name: name) }
    }
}

struct Rename: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Rename a volume or snapshot.")
    @Argument(help: "Path of the pool file.") var pool: String
    @Argument(help: "Current name.") var old: String
    @Argument(help: "New name.") var new: String

    func run() throws {
        try withWritablePool(pool) { try $0.rename(old, to: new) }
    }
}

struct Resize: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Grow or shrink a volume (shrinking needs --shrink).")
    @Argument(help: "Path of the pool file.") var pool: String
    @Argument(help: "The volume to resize (snapshots cannot be resized).") var name: String
    @Option(parsing: .unconditional, help: "New size (a multiple of the block size).", transform: ByteSize.argument) var size: ByteSize
    @Flag(help: "Allow a smaller size: the data past the new end is dropped (as qemu-img resize --shrink).") var shrink = false

    func run() throws {
        var dropped: UInt64 = 0
        try withWritablePool(pool) { dropped = try $0.resize(name, size: size.bytes, allowShrink: shrink) }
        if shrink && dropped > 0 {
            var err = StandardError()
            print("dropped \(dropped) bytes of mapped data past the new end of \(oneLine(name))", to: &err)
        }
    }
}

struct Write: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write stdin (or --input) into a volume; syncs before exit.",
        discussion: """
            With --input FILE (a regular file), the space the whole file needs is checked first \
            (every block not owned by the volume alone counted uncompressed): a write that \
            does not fit fails with "pool full" before anything is written. Standard input's \
            length is unknown in advance: it is written in 1 MiB atomic units, and if the pool \
            fills (or another error stops it) part-way, what was written before is synced and \
            the error says exactly how many bytes that is and where they end.
            """)
    @Argument(help: "Path of the pool file.") var pool: String
    @Argument(help: "The volume to write into.") var name: String
    @Option(parsing: .unconditional, help: "Byte offset in the volume (default: 0).", transform: ByteSize.argument) var offset = ByteSize(0)
    @Option(help: "Read from this file instead of stdin.") var input: String?

    func run() throws {
        let fd: Int32
        var inputByteCount: UInt64? = nil
        if let input {
            let opened = openPath(input, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY)
            guard opened >= 0 else {
                if errno == ENOENT { throw PoolError.notFound(input) }
                throw PoolError.io(errno: errno, operation: "open \(input)", byteOffset: 0)
            }
            var info = stat()
            guard fstat(opened, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG else {
                close(opened)
                throw PoolError.invalidArgument("--input \(input) is not a regular file (use standard input for a pipe or device)")
            }
            if isPoolFile(pool, info) {
                close(opened)
                throw PoolError.invalidArgument("--input is the pool file itself")
            }
            _ = fcntl(opened, F_SETFL, fcntl(opened, F_GETFL) & ~O_NONBLOCK)
            fd = opened
            inputByteCount = UInt64(info.st_size)
        } else {
            guard !CommandStreams.inputWasClosed else {
                throw ValidationError("standard input is closed; give the data on standard input or with --input FILE")
            }
            guard isatty(CommandStreams.input) == 0 else {
                throw ValidationError("standard input is a terminal; pipe the data in (e.g. `cat FILE | logpool write ...`) or use --input FILE")
            }
            var info = stat()
            guard fstat(CommandStreams.input, &info) == 0 else { throw PoolError.io(errno: errno, operation: "fstat standard input", byteOffset: 0) }
            if (info.st_mode & S_IFMT) == S_IFDIR { throw ValidationError("standard input is a directory") }
            if isPoolFile(pool, info) { throw PoolError.invalidArgument("standard input is the pool file itself") }
            if (info.st_mode & S_IFMT) == S_IFREG {
                // `< FILE`: a regular file's remaining length is known, so it is admitted
                // whole like --input.
                let position = lseek(CommandStreams.input, 0, SEEK_CUR)
                if position >= 0, info.st_size >= position { inputByteCount = UInt64(info.st_size - position) }
            }
            fd = CommandStreams.input
        }
        defer { if fd != CommandStreams.input { close(fd) } }
        let source = input ?? "standard input"
        var written: UInt64 = 0
        // On a terminal: bytes, rate and (for a file) ETA while it runs.
        let progress = TerminalProgress("write \(oneLine(name))", total: inputByteCount ?? 0)
        do {
            try copyInput(progress: progress, source: source, fd: fd, inputByteCount: inputByteCount, written: &written)
        } catch {
            progress.clear()
            throw error
        }
        progress.clear()
        var err = StandardError()
        print("wrote \(written) bytes to \(oneLine(name)) at offset \(offset.bytes)", to: &err)
    }

    /// The copy loop of ``run()``: admits a file whole, writes 1 MiB units, syncs.
    private func copyInput(progress: TerminalProgress, source: String, fd: Int32, inputByteCount: UInt64?, written: inout UInt64) throws {
        try withWritablePool(pool) { opened in
            let volume = try opened.openVolume(name: name)
            if let count = inputByteCount {
                // The whole file is admitted before its first byte is written.
                try volume.checkRoom(forWritingAt: offset.bytes, byteCount: count)
            }
            var chunk = [UInt8](repeating: 0, count: 1 << 20)
            var position = offset.bytes
            do {
                while true {
                    try CommandStreams.checkClient()
                    let count = try readFull(fd, into: &chunk, what: source)
                    if count == 0 { break }
                    try chunk.withUnsafeBytes { try volume.write(at: position, from: UnsafeRawBufferPointer(rebasing: $0[0..<count])) }
                    position += UInt64(count)
                    progress.update(position - offset.bytes)
                    if count < chunk.count { break }
                }
            } catch let error as PoolError {
                // Each 1 MiB unit is atomic: what was written before the failure stays.
                // Make it durable and say exactly how much it is.
                let done = position - offset.bytes
                guard done > 0 else { throw error }
                var synced = true
                do { try opened.sync() } catch { synced = false }
                throw PartialWriteError(byteCount: done, startByteOffset: offset.bytes, volume: name, cause: error, synced: synced)
            }
            try opened.sync()
            written = position - offset.bytes
        }
    }
}

/// A stream write that stopped part-way: what was written before is synced.
struct PartialWriteError: ReportedError {
    var byteCount: UInt64
    var startByteOffset: UInt64
    var volume: String
    var cause: PoolError
    /// False when the sync after the failure failed too (the pool handle was poisoned):
    /// then those bytes are durable only as far as the last sync that completed.
    var synced: Bool

    var description: String {
        let range = "(\(volume) bytes \(startByteOffset) to \(startByteOffset + byteCount))"
        return synced
            ? "\(cause); the \(byteCount) bytes before it were written and synced \(range), nothing after them"
            : "\(cause); the \(byteCount) bytes before it were written but NOT synced \(range): reopen the pool to see what survived"
    }
}

/// Fills `buffer` from `fd` until it is full or the input ends; returns the byte count.
func readFull(_ fd: Int32, into buffer: inout [UInt8], what: String) throws -> Int {
    var done = 0
    while done < buffer.count {
        let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress! + done, $0.count - done) }
        if n < 0 {
            if errno == EINTR { continue }
            throw PoolError.io(errno: errno, operation: "read from \(what)", byteOffset: 0)
        }
        if n == 0 { break }
        done += n
    }
    return done
}

struct Read: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Read a volume to stdout (or --output).")
    @Argument(help: "Path of the pool file.") var pool: String
    @Argument(help: "The volume or snapshot to read.") var name: String
    @Option(parsing: .unconditional, help: "Byte offset in the volume (default: 0).", transform: ByteSize.argument) var offset = ByteSize(0)
    @Option(parsing: .unconditional, help: "Bytes to read (default: to the end of the volume).", transform: ByteSize.argument) var length: ByteSize?
    @Option(help: "Write to this file instead of stdout (\"-\" for stdout, also when it is a terminal).") var output: String?
    @OptionGroup var salvage: SalvageOption

    func run() throws {
        if output == nil && isatty(CommandStreams.output) == 1 {
            throw ValidationError("standard output is a terminal; redirect it, or give --output FILE (--output - writes to the terminal anyway)")
        }
        let opened = try openForReading(pool, salvage)
        defer { release(opened) }
        let volume = try opened.openVolume(name: name)
        let size = volume.size
        guard offset.bytes <= size else { throw PoolError.outOfRange("offset \(offset.bytes) beyond \(name)'s size \(size)") }
        let total = length?.bytes ?? (size - offset.bytes)
        // The whole range is checked before any output file is created or truncated.
        guard total <= size - offset.bytes else {
            throw PoolError.outOfRange("\(total) bytes at offset \(offset.bytes) of \(name), which is \(size) bytes")
        }
        let sink: CheckedOutput
        var ownedDescriptor: Int32? = nil
        if let output, output != "-" {
            var target = stat()
            if statPath(output, &target) == 0, isPoolFile(pool, target) {
                throw PoolError.invalidArgument("--output is the pool file itself")
            }
            let fd = openPath(output, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            guard fd >= 0 else { throw PoolError.io(errno: errno, operation: "create \(output)", byteOffset: 0) }
            ownedDescriptor = fd
            sink = CheckedOutput(fd: fd, what: output)
        } else {
            sink = CheckedOutput.standardOutput
        }
        defer { if let ownedDescriptor { close(ownedDescriptor) } }
        var buffer = [UInt8](repeating: 0, count: Int(min(UInt64(1 << 20), max(total, 1))))
        var done: UInt64 = 0
        while done < total {
            try CommandStreams.checkClient()
            let take = Int(min(UInt64(buffer.count), total - done))
            try buffer.withUnsafeMutableBytes { raw in
                let part = UnsafeMutableRawBufferPointer(rebasing: raw[0..<take])
                try volume.read(at: offset.bytes + done, into: part)
                try sink.write(UnsafeRawBufferPointer(part))
            }
            done += UInt64(take)
        }
        // A regular output file is made durable; a device, pipe or FIFO has nothing to sync.
        var outputInfo = stat()
        if let ownedDescriptor, fstat(ownedDescriptor, &outputInfo) == 0, (outputInfo.st_mode & S_IFMT) == S_IFREG,
           fsync(ownedDescriptor) != 0 {
            throw PoolError.io(errno: errno, operation: "fsync \(output ?? "")", byteOffset: 0)
        }
    }
}

struct Compact: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Reclaim dead space now.")
    @Argument(help: "Path of the pool file.") var pool: String

    func run() throws {
        var before: PoolStats? = nil, after: PoolStats? = nil
        var report = CompactionReport()
        try withWritablePool(pool) { opened in
            before = opened.stats
            report = try opened.compact()
            after = opened.stats
        }
        guard let before, let after else { return }
        try out("compacted \(report.segmentsCompacted) segments: moved \(report.blocksMoved) blocks (\(formatBytes(report.bytesMoved))), rewrote \(report.pagesRewritten) metadata pages")
        try out("freed \(report.segmentsFreed) segments (\(formatBytes(report.bytesFreed))); dead \(formatBytes(before.deadBytes)) -> \(formatBytes(after.deadBytes)), unwritten \(formatBytes(before.unwrittenBytes)) -> \(formatBytes(after.unwrittenBytes))")
    }
}

struct SyncCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sync",
        abstract: "Make every change the pool has acknowledged durable.",
        discussion: """
            Offline: opens the pool, recovers it if it was not closed cleanly, and closes it with \
            a checkpoint. On a pool logpool serve holds: syncs the served pool, so every write \
            any NBD client has had an answer for is durable when this returns (as an NBD FLUSH \
            on any connection does).
            """)
    @Argument(help: "Path of the pool file.") var pool: String

    func run() throws {
        try withWritablePool(pool) { _ in }
    }
}
