import ArgumentParser
import Foundation
import LogPool

struct Init: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Create a new pool file.")
    @Argument(help: "Path of the pool file to create.") var pool: String
    @Option(help: "Pool file size.") var size: ByteSize
    @Option(help: "Block size: unit of addressing and copy-on-write (512 to 64K).") var blockSize = ByteSize(argument: "4K")!
    @Option(help: "Segment size: unit of allocation and compaction (default: 1/64 of the pool, 64K to 4M).") var segmentSize: ByteSize?
    @Option(help: "Block compression: lz4 or none.") var compression: CompressionMode = .lz4

    func run() throws {
        guard blockSize.bytes <= UInt64(Int32.max), (segmentSize?.bytes ?? 0) <= UInt64(Int32.max) else {
            throw PoolError.invalidArgument("block or segment size is too large")
        }
        let created = try Pool.create(at: pool, capacity: size.bytes, blockSize: Int(blockSize.bytes),
                                      segmentSize: segmentSize.map { Int($0.bytes) }, compression: compression)
        let stats = created.stats
        try created.close()
        print("created \(pool): \(formatBytes(stats.capacityBytes)), block \(stats.blockSize), segment \(stats.segmentSize), compression \(stats.compression), \(formatBytes(stats.freeBytes)) free")
    }
}

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show pool geometry and space figures.")
    @Argument var pool: String
    @Flag(help: "One JSON object.") var json = false

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
        let opened = try Pool.open(at: pool, mode: .readOnly)
        defer { try? opened.close() }
        let s = opened.stats
        let report = opened.recoveryReport
        let out = Output(stats: s, chosenSuperblockSlot: report.chosenSlot == 0 ? "A" : "B",
                         otherSlotProblem: report.otherSlotProblem, replayedRecordCount: report.replayedRecordCount,
                         replayStopReason: report.replayStopReason, findings: report.findings)
        if json { return try printJSON(out) }
        printTable([
            ["capacity", formatBytes(s.capacityBytes)],
            ["used", formatBytes(s.usedBytes)],
            ["dead (awaiting compaction)", formatBytes(s.deadBytes)],
            ["free", formatBytes(s.freeBytes)],
            ["reserve", formatBytes(s.reserveBytes)],
            ["overhead", formatBytes(s.overheadBytes)],
            ["volumes", "\(s.volumeCount)"],
            ["snapshots", "\(s.snapshotCount)"],
            ["block size", "\(s.blockSize)"],
            ["segment size", "\(s.segmentSize) x \(s.segmentCount) (\(s.freeSegmentCount) free)"],
            ["journal", formatBytes(s.journalBytes)],
            ["compression", s.compression],
            ["atomic write unit", formatBytes(UInt64(s.atomicWriteBytes))],
            ["cleanly closed", s.cleanlyClosed ? "yes" : "no"],
            ["superblock", "slot \(out.chosenSuperblockSlot), generation \(s.generation)"],
        ])
        if let problem = report.otherSlotProblem { print("warning: \(problem)") }
        if report.replayedRecordCount > 0 { print("recovery: replayed \(report.replayedRecordCount) journal records; stopped: \(report.replayStopReason)") }
        for finding in report.findings { print("finding: \(finding)") }
    }
}

struct Create: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Create a new empty volume.")
    @Argument var pool: String
    @Argument var name: String
    @Option(help: "Volume size (a multiple of the block size).") var size: ByteSize

    func run() throws {
        try withWritablePool(pool) { try $0.createVolume(name: name, size: size.bytes) }
    }
}

struct List: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List volumes and snapshots with space figures.")
    @Argument var pool: String
    @Flag(help: "A JSON array.") var json = false

    func run() throws {
        let opened = try Pool.open(at: pool, mode: .readOnly)
        defer { try? opened.close() }
        let rows = try opened.list()
        if json { return try printJSON(rows.map(VolumeRow.init)) }
        printVolumeTable(rows)
    }
}

struct Snapshot: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Create an immutable snapshot of a volume or snapshot.")
    @Argument var pool: String
    @Argument var source: String
    @Argument var name: String

    func run() throws {
        try withWritablePool(pool) { try $0.snapshot(source: source, name: name) }
    }
}

struct Clone: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Create a writable clone of a volume or snapshot.")
    @Argument var pool: String
    @Argument var source: String
    @Argument var name: String

    func run() throws {
        try withWritablePool(pool) { try $0.clone(source: source, name: name) }
    }
}

struct Destroy: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Delete a volume or snapshot.")
    @Argument var pool: String
    @Argument var name: String

    func run() throws {
        try withWritablePool(pool) { try $0.delete(name: name) }
    }
}

struct Rename: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Rename a volume or snapshot.")
    @Argument var pool: String
    @Argument var old: String
    @Argument var new: String

    func run() throws {
        try withWritablePool(pool) { try $0.rename(old, to: new) }
    }
}

struct Resize: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Grow or shrink a volume.")
    @Argument var pool: String
    @Argument var name: String
    @Option(help: "New size (a multiple of the block size).") var size: ByteSize

    func run() throws {
        try withWritablePool(pool) { try $0.resize(name, size: size.bytes) }
    }
}

struct Write: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Write stdin (or --input) into a volume; syncs before exit.")
    @Argument var pool: String
    @Argument var name: String
    @Option(help: "Byte offset in the volume.") var offset: ByteSize = ByteSize(argument: "0")!
    @Option(help: "Read from this file instead of stdin.") var input: String?

    /// A file input is checked against the volume's size before anything is written, so
    /// an oversized input changes nothing. Stdin's length is unknown in advance: what was
    /// written before an error stays written (each 1 MiB chunk is atomic).
    func run() throws {
        let handle: FileHandle
        var inputByteCount: UInt64? = nil
        if let input {
            var info = stat()
            guard stat(input, &info) == 0 else { throw PoolError.notFound(input) }
            guard (info.st_mode & S_IFMT) == S_IFREG else { throw PoolError.invalidArgument("\(input) is not a regular file") }
            guard let h = FileHandle(forReadingAtPath: input) else { throw PoolError.io(errno: errno, operation: "open \(input)", byteOffset: 0) }
            handle = h
            inputByteCount = UInt64(info.st_size)
        } else {
            handle = FileHandle.standardInput
        }
        var written: UInt64 = 0
        try withWritablePool(pool) { opened in
            let volume = try opened.openVolume(name: name)
            if let count = inputByteCount {
                let (end, overflow) = offset.bytes.addingReportingOverflow(count)
                guard !overflow, end <= volume.size else {
                    throw PoolError.outOfRange("\(count) bytes at offset \(offset.bytes) of \(name), which is \(volume.size) bytes")
                }
            }
            var position = offset.bytes
            while true {
                let chunk = try handle.read(upToCount: 1 << 20) ?? Data()
                if chunk.isEmpty { break }
                try chunk.withUnsafeBytes { try volume.write(at: position, from: $0) }
                position += UInt64(chunk.count)
            }
            try opened.sync()
            written = position - offset.bytes
        }
        var err = StandardError()
        print("wrote \(written) bytes to \(name) at offset \(offset.bytes)", to: &err)
    }
}

struct Read: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Read a volume to stdout (or --output).")
    @Argument var pool: String
    @Argument var name: String
    @Option(help: "Byte offset in the volume.") var offset: ByteSize = ByteSize(argument: "0")!
    @Option(help: "Bytes to read (default: to the end of the volume).") var length: ByteSize?
    @Option(help: "Write to this file instead of stdout.") var output: String?

    func run() throws {
        let opened = try Pool.open(at: pool, mode: .readOnly)
        defer { try? opened.close() }
        let volume = try opened.openVolume(name: name)
        let size = volume.size
        guard offset.bytes <= size else { throw PoolError.outOfRange("offset \(offset.bytes) beyond \(name)'s size \(size)") }
        let total = length?.bytes ?? (size - offset.bytes)
        // The whole range is checked before any output file is created or truncated.
        guard total <= size - offset.bytes else {
            throw PoolError.outOfRange("\(total) bytes at offset \(offset.bytes) of \(name), which is \(size) bytes")
        }
        let sink: FileHandle
        if let output {
            var target = stat(), source = stat()
            if stat(output, &target) == 0, stat(pool, &source) == 0, target.st_dev == source.st_dev, target.st_ino == source.st_ino {
                throw PoolError.invalidArgument("--output is the pool file itself")
            }
            let fd = open(output, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            guard fd >= 0 else { throw PoolError.io(errno: errno, operation: "create \(output)", byteOffset: 0) }
            sink = FileHandle(fileDescriptor: fd, closeOnDealloc: true)
        } else {
            sink = FileHandle.standardOutput
        }
        var done: UInt64 = 0
        while done < total {
            let take = Int(min(UInt64(1 << 20), total - done))
            let bytes = try volume.read(at: offset.bytes + done, length: take)
            try writeOut(Data(bytes), to: sink, what: output ?? "standard output")
            done += UInt64(take)
        }
    }
}

struct Compact: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Reclaim dead space now.")
    @Argument var pool: String

    func run() throws {
        var before: PoolStats? = nil, after: PoolStats? = nil
        var report = CompactionReport()
        try withWritablePool(pool) { opened in
            before = opened.stats
            report = try opened.compact()
            after = opened.stats
        }
        guard let before, let after else { return }
        print("compacted \(report.segmentsCompacted) segments: moved \(report.blocksMoved) blocks (\(formatBytes(report.bytesMoved))), rewrote \(report.pagesRewritten) metadata pages")
        print("freed \(report.segmentsFreed) segments (\(formatBytes(report.bytesFreed))); dead \(formatBytes(before.deadBytes)) -> \(formatBytes(after.deadBytes)), free \(formatBytes(before.freeBytes)) -> \(formatBytes(after.freeBytes))")
    }
}
