import ArgumentParser
import Foundation
import LogPool
import LogPoolCLIKit

#if canImport(Glibc)
import Glibc
#endif

/// Progress of a long copy on a terminal: bytes done, rate and ETA on one line of stderr,
/// rewritten in place at most every quarter second, then a one-line summary. Nothing at
/// all when stderr is not a terminal.
final class TerminalProgress {
    let label: String
    let total: UInt64
    let enabled = isatty(CommandStreams.error) == 1
    private let start = Date()
    private var shown = Date.distantPast

    init(_ label: String, total: UInt64) {
        self.label = label
        self.total = total
    }

    func update(_ done: UInt64) {
        guard enabled, Date().timeIntervalSince(shown) >= 0.25 else { return }
        shown = Date()
        let seconds = max(Date().timeIntervalSince(start), 0.001)
        let rate = Double(done) / seconds
        var err = StandardError()
        guard total > 0 else {
            // A stream of unknown length: bytes and rate only.
            print("\r\(label): \(formatBytes(done)), \(formatBytes(UInt64(rate)))/s   ", terminator: "", to: &err)
            return
        }
        let eta = rate > 0 && total > done ? String(format: "%.0f s", Double(total - done) / rate) : "-"
        print("\r\(label): \(formatBytes(done)) of \(formatBytes(total)), \(formatBytes(UInt64(rate)))/s, ETA \(eta)   ", terminator: "", to: &err)
    }

    /// Erases the progress line (the command prints its own summary).
    func clear() {
        guard enabled, shown != Date.distantPast else { return }
        var err = StandardError()
        print("\r" + String(repeating: " ", count: 79) + "\r", terminator: "", to: &err)
    }

    func finish(_ summary: String) {
        guard enabled else { return }
        let seconds = Date().timeIntervalSince(start)
        var err = StandardError()
        print("\r\(label): \(summary) in \(String(format: "%.1f", seconds)) s" + String(repeating: " ", count: 20), to: &err)
    }
}

struct MapCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "map",
        abstract: "List a volume's mapped extents and holes, as qemu-img map shows a raw image.")
    @Argument(help: "Path of the pool file.") var pool: String
    @Argument(help: "The volume or snapshot.") var name: String
    @Flag(help: "JSON: an array of {start, length, data} objects, as qemu-img map --output=json.") var json = false
    @OptionGroup var salvage: SalvageOption

    struct Entry: Encodable {
        var start: UInt64
        var length: UInt64
        var data: Bool
        var zero: Bool
    }

    func run() throws {
        let opened = try openForReading(pool, salvage)
        defer { release(opened) }
        let extents = try opened.openVolume(name: name).extents()
        if json {
            try printJSON(extents.map { Entry(start: $0.offset, length: $0.length, data: $0.isMapped, zero: !$0.isMapped) })
            return
        }
        var table = [["OFFSET", "LENGTH", "KIND"]]
        for e in extents { table.append([String(e.offset), String(e.length), e.isMapped ? "data" : "hole"]) }
        try printTable(table)
    }
}

struct Export: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write a volume or snapshot as a sparse raw image.",
        discussion: """
            To a file: the file gets the volume's size and only mapped blocks are written, so \
            holes stay holes (du shows only the data). To "-" (standard output, not a \
            terminal): every byte, zeros streamed for holes. The pool is opened read-only and \
            locked against writers for the whole export, so the image is one moment of the volume. \
            On a pool logpool serve holds, the server exports a writable volume through a \
            temporary snapshot (.export-PID-N, destroyed at the end), while clients keep writing.
            """)
    @Argument(help: "Path of the pool file.") var pool: String
    @Argument(help: "The volume or snapshot to export.") var name: String
    @Argument(help: "The raw image to create or replace, or - for standard output.") var file: String
    @OptionGroup var salvage: SalvageOption

    func run() throws {
        if file == "-" && isatty(CommandStreams.output) == 1 {
            throw ValidationError("standard output is a terminal; redirect it, or give a FILE")
        }
        let opened = try openForReading(pool, salvage)
        defer { release(opened) }
        var volume = try opened.openVolume(name: name)
        let size = volume.size
        // A served volume keeps taking writes: export one moment of it, a temporary
        // snapshot, destroyed again whatever happens below.
        var temporary: String? = nil
        defer { if let temporary { ServedPool.destroyTemporary(temporary, in: opened) } }
        if opened === ServedPool.current && !volume.isReadOnly {
            (temporary, volume) = try ServedPool.temporarySnapshot(of: name, in: opened)
        }
        var fd = CommandStreams.output
        var sparse = false
        if file != "-" {
            var target = stat()
            if statPath(file, &target) == 0 {
                if isPoolFile(pool, target) { throw PoolError.invalidArgument("the image is the pool file itself") }
                if (target.st_mode & S_IFMT) != S_IFREG {
                    throw PoolError.invalidArgument("\(oneLine(file)) exists and is not a regular file; export writes regular files or standard output")
                }
            }
            fd = openPath(file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            guard fd >= 0 else { throw PoolError.io(errno: errno, operation: "create \(file)", byteOffset: 0) }
            sparse = true
        }
        defer { if fd != CommandStreams.output { close(fd) } }
        let progress = TerminalProgress("export \(oneLine(name))", total: size)
        let mapped = try volume.exportRaw(to: fd, sparse: sparse) { done in
            try CommandStreams.checkClient()
            progress.update(done)
        }
        if sparse && fsync(fd) != 0 { throw PoolError.io(errno: errno, operation: "fsync \(file)", byteOffset: 0) }
        progress.finish("\(formatBytes(size)) image, \(formatBytes(mapped)) mapped")
    }
}

struct Import: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create a volume from a raw image; all-zero blocks stay unmapped.",
        discussion: """
            A regular file's holes are skipped without reading them (SEEK_DATA/SEEK_HOLE). From \
            "-" (standard input) --size is required, and the input may be shorter (the rest \
            reads as zeros) but not longer. If the import fails (pool full, a read error), the \
            new volume is deleted again and the pool is as it was.
            """)
    @Argument(help: "Path of the pool file.") var pool: String
    @Argument(help: "The raw image, or - for standard input.") var file: String
    @Argument(help: "Name of the new volume.") var name: String
    @Option(parsing: .unconditional, help: "Volume size (default: the file's size, rounded up to the block size).", transform: ByteSize.argument)
    var size: ByteSize?

    func run() throws {
        var fd = CommandStreams.input
        var fileSize: UInt64? = nil
        if file != "-" {
            var target = stat()
            if statPath(file, &target) == 0, isPoolFile(pool, target) {
                throw PoolError.invalidArgument("the image is the pool file itself")
            }
            fd = openPath(file, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { throw PoolError.io(errno: errno, operation: "open \(file)", byteOffset: 0) }
            var info = stat()
            if fstat(fd, &info) == 0 && (info.st_mode & S_IFMT) == S_IFREG { fileSize = UInt64(info.st_size) }
        }
        defer { if fd != CommandStreams.input { close(fd) } }
        guard let volumeSize = size?.bytes ?? fileSize else {
            throw ValidationError("--size is required when the image is not a regular file")
        }
        if let fileSize, volumeSize < fileSize {
            throw ValidationError("--size \(volumeSize) is smaller than the image's \(fileSize) bytes")
        }
        let progress = TerminalProgress("import \(oneLine(name))", total: fileSize ?? volumeSize)
        var written: UInt64 = 0
        try withWritablePool(pool) { opened in
            written = try opened.importRaw(from: fd, name: name, size: volumeSize) { done in
                try CommandStreams.checkClient()
                progress.update(done)
            }
        }
        progress.finish("\(formatBytes(volumeSize)) volume, \(formatBytes(written)) of non-zero blocks written")
    }
}

struct Discard: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Unmap a byte range of a volume: it reads as zeros and whole blocks are freed.")
    @Argument(help: "Path of the pool file.") var pool: String
    @Argument(help: "The volume.") var name: String
    @Option(parsing: .unconditional, help: "Byte offset in the volume.", transform: ByteSize.argument) var offset: ByteSize
    @Option(parsing: .unconditional, help: "Bytes to discard.", transform: ByteSize.argument) var length: ByteSize

    func run() throws {
        try withWritablePool(pool) { opened in
            let volume = try opened.openVolume(name: name)
            try volume.discard(at: offset.bytes, length: length.bytes)
            try opened.sync()
        }
    }
}
