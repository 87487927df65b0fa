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

    func run() throws {
        let handle: FileHandle
        if let input {
            guard let h = FileHandle(forReadingAtPath: input) else { throw PoolError.notFound(input) }
            handle = h
        } else {
            handle = FileHandle.standardInput
        }
        let opened = try Pool.open(at: pool)
        let volume = try opened.openVolume(name: name)
        var position = offset.bytes
        while true {
            let chunk = try handle.read(upToCount: 1 << 20) ?? Data()
            if chunk.isEmpty { break }
            try chunk.withUnsafeBytes { try volume.write(at: position, from: $0) }
            position += UInt64(chunk.count)
        }
        try opened.sync()
        try opened.close()
        var err = StandardError()
        print("wrote \(position - offset.bytes) bytes to \(name) at offset \(offset.bytes)", to: &err)
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
        let sink: FileHandle
        if let output {
            guard FileManager.default.createFile(atPath: output, contents: nil), let h = FileHandle(forWritingAtPath: output) else {
                throw PoolError.io(errno: errno, operation: "create \(output)", byteOffset: 0)
            }
            sink = h
        } else {
            sink = FileHandle.standardOutput
        }
        var done: UInt64 = 0
        while done < total {
            let take = Int(min(UInt64(1 << 20), total - done))
            let bytes = try volume.read(at: offset.bytes + done, length: take)
            sink.write(Data(bytes))
            done += UInt64(take)
        }
    }
}

struct Compact: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Reclaim dead space now.")
    @Argument var pool: String

    func run() throws {
        let opened = try Pool.open(at: pool)
        let before = opened.stats
        let report = try opened.compact()
        let after = opened.stats
        try opened.close()
        print("compacted \(report.segmentsCompacted) segments: moved \(report.blocksMoved) blocks (\(formatBytes(report.bytesMoved))), rewrote \(report.pagesRewritten) metadata pages")
        print("freed \(report.segmentsFreed) segments (\(formatBytes(report.bytesFreed))); dead \(formatBytes(before.deadBytes)) -> \(formatBytes(after.deadBytes)), free \(formatBytes(before.freeBytes)) -> \(formatBytes(after.freeBytes))")
    }
}
