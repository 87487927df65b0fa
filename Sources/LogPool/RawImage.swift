import LogPoolFormat

#if canImport(Glibc)
import Glibc
#endif

/// One run of a volume's address space: mapped (a block is stored for every block of
/// it) or a hole (reads as zeros, takes no space), as `qemu-img map` shows a raw image.
public struct VolumeExtent: Sendable, Equatable, CustomStringConvertible {
    /// Byte offset in the volume.
    public var offset: UInt64
    /// Length in bytes (a multiple of the block size, except where the volume ends).
    public var length: UInt64
    /// True when blocks are stored here; false for a hole.
    public var isMapped: Bool

    public init(offset: UInt64, length: UInt64, isMapped: Bool) {
        self.offset = offset
        self.length = length
        self.isMapped = isMapped
    }

    public var description: String { "\(offset)+\(length) \(isMapped ? "data" : "hole")" }
}

extension Volume {
    /// The volume's runs of mapped blocks and holes, in order, covering `0..<size`
    /// exactly, with neighbouring runs of the same kind merged. Cost: one walk of the
    /// volume's map (unmapped subtrees are skipped whole), no data read.
    public func extents() throws -> [VolumeExtent] {
        try pool.locked {
            let volume = try state()
            return try pool.engine.extents(of: volume, in: 0..<volume.record.sizeByteCount)
        }
    }

    /// The runs of ``extents()`` that overlap `range`, clipped to it: only the part of the
    /// map under the range is walked (NBD block status asks this per request).
    public func extents(in range: Range<UInt64>) throws -> [VolumeExtent] {
        try pool.locked {
            let volume = try state()
            guard range.upperBound <= volume.record.sizeByteCount else {
                throw PoolError.outOfRange("\(range) of \(volume.record.name), which is \(volume.record.sizeByteCount) bytes")
            }
            return try pool.engine.extents(of: volume, in: range)
        }
    }

    /// Writes the volume as a raw image to `fd`: `size` bytes, holes as holes.
    ///
    /// - `sparse` (a regular file or a block device that reads unwritten ranges as
    ///   zeros): only mapped blocks are written, at their offsets, and the file is
    ///   truncated to the volume's size, so holes take no space. The file must be empty
    ///   or all zeros where the volume has holes (a new or truncated file is).
    /// - otherwise (a pipe, a terminal): every byte in order, zeros streamed for holes.
    ///
    /// `progress` is called with the bytes done so far after each chunk; an error it throws
    /// stops the export and is rethrown (cancellation). Returns the
    /// bytes of mapped data written. The pool's lock is taken per chunk, so a writer on
    /// another thread may change the volume between chunks: export a snapshot for an
    /// image of one moment (the CLI holds the pool's file lock, so it has no writer).
    @discardableResult
    public func exportRaw(to fd: Int32, sparse: Bool, progress: ((UInt64) throws -> Void)? = nil) throws -> UInt64 {
        let size = self.size
        let chunk = 1 << 20
        var buffer = [UInt8](repeating: 0, count: chunk)
        var mappedBytes: UInt64 = 0
        var done: UInt64 = 0
        func put(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
            var written = 0
            while written < bytes.count {
                let part = UnsafeRawBufferPointer(rebasing: bytes[written...])
                let n = sparse ? pwrite(fd, part.baseAddress, part.count, off_t(offset + UInt64(written)))
                    : Glibc.write(fd, part.baseAddress, part.count)
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else {
                    throw PoolError.io(errno: n < 0 ? errno : EIO, operation: "write raw image", byteOffset: offset + UInt64(written))
                }
                written += n
            }
        }
        for extent in try extents() {
            var at = extent.offset
            let end = extent.offset + extent.length
            while at < end {
                let take = Int(min(UInt64(chunk), end - at))
                if extent.isMapped {
                    try buffer.withUnsafeMutableBytes { raw in
                        let part = UnsafeMutableRawBufferPointer(rebasing: raw[0..<take])
                        try read(at: at, into: part)
                        try put(UnsafeRawBufferPointer(part), at: at)
                    }
                    mappedBytes += UInt64(take)
                } else if !sparse {
                    try buffer.withUnsafeMutableBytes { raw in
                        let part = UnsafeMutableRawBufferPointer(rebasing: raw[0..<take])
                        part.initializeMemory(as: UInt8.self, repeating: 0)
                        try put(UnsafeRawBufferPointer(part), at: at)
                    }
                }
                at += UInt64(take)
                done = at
                try progress?(done)
            }
        }
        if sparse && ftruncate(fd, off_t(size)) != 0 {
            throw PoolError.io(errno: errno, operation: "set the raw image's size to \(size)", byteOffset: 0)
        }
        return mappedBytes
    }
}

extension Pool {
    /// Creates volume `name` of `size` bytes from the raw image readable on `fd`, and
    /// syncs. Blocks that are all zeros stay unmapped. On a regular file, `SEEK_DATA` and
    /// `SEEK_HOLE` skip the file's holes without reading them. A size that is not a
    /// multiple of the block size is rounded up (the tail reads as zeros).
    ///
    /// The image must hold exactly `size` bytes when it is a regular file (use a larger
    /// `size` to import into a bigger volume: the rest reads as zeros); from a pipe it may
    /// be shorter (the rest is zeros) but not longer. If anything fails (the input,
    /// `poolFull`, or an error `progress` throws to cancel), the new volume is deleted
    /// again, so the pool is left as it was.
    ///
    /// Returns the bytes of non-zero blocks written.
    @discardableResult
    public func importRaw(from fd: Int32, name: String, size: UInt64, progress: ((UInt64) throws -> Void)? = nil) throws -> UInt64 {
        let bs = UInt64(stats.blockSize)
        let volumeSize = (size + bs - 1) / bs * bs
        guard volumeSize > 0 else { throw PoolError.invalidArgument("an image of 0 bytes: give a size") }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw PoolError.io(errno: errno, operation: "stat the raw image", byteOffset: 0) }
        let regular = (info.st_mode & S_IFMT) == S_IFREG
        if regular && UInt64(info.st_size) > volumeSize {
            throw PoolError.invalidArgument("the image is \(info.st_size) bytes, larger than the volume's \(volumeSize)")
        }
        let volume = try createVolume(name: name, size: volumeSize)
        do {
            let written = try RawImporter(volume: volume, fd: fd, blockByteCount: Int(bs), volumeSize: volumeSize,
                                          fileSize: regular ? UInt64(info.st_size) : nil, progress: progress).run()
            try sync()
            return written
        } catch {
            // Leave the pool as it was; the import's own error is the one to report.
            try? delete(name: name)
            try? sync()
            throw error
        }
    }
}

/// `lseek` whences Glibc's module does not export (they need _GNU_SOURCE): Linux values.
private let seekData: Int32 = 3
private let seekHole: Int32 = 4

/// The loop of ``Pool/importRaw(from:name:size:progress:)``: reads the image in chunks,
/// skips zero blocks (and a regular file's holes), writes runs of non-zero blocks.
struct RawImporter {
    let volume: Volume
    let fd: Int32
    let blockByteCount: Int
    let volumeSize: UInt64
    /// The file's size when it is a regular file (then holes are found by seeking).
    let fileSize: UInt64?
    let progress: ((UInt64) throws -> Void)?

    func run() throws -> UInt64 {
        let chunk = 1 << 20
        var buffer = [UInt8](repeating: 0, count: chunk)
        var written: UInt64 = 0
        var at: UInt64 = 0
        let end = fileSize ?? volumeSize
        while at < end {
            if fileSize != nil {
                // Jump over the file's holes; a filesystem without SEEK_DATA reports the
                // whole file as data, which only costs reading it.
                let data = lseek(fd, off_t(at), seekData)
                if data < 0 {
                    if errno == ENXIO { break }  // only a hole up to the end
                    if errno != EINVAL { throw PoolError.io(errno: errno, operation: "seek for data in the raw image", byteOffset: at) }
                } else if UInt64(data) > at {
                    at = UInt64(data) / UInt64(blockByteCount) * UInt64(blockByteCount)
                    try progress?(at)
                }
            }
            var want = Int(min(UInt64(chunk), end - at))
            if fileSize != nil {
                // Stop at the next hole, so a hole is never read.
                let hole = lseek(fd, off_t(at), seekHole)
                if hole > off_t(at) { want = min(want, Int(UInt64(hole) - at)) }
            }
            let got = try fill(&buffer, count: want, at: at)
            if got == 0 {
                break  // a pipe that ended early: the rest reads as zeros
            }
            if fileSize == nil && at + UInt64(got) > volumeSize {
                throw PoolError.invalidArgument("standard input holds more than the volume's \(volumeSize) bytes")
            }
            written += try writeNonZeroRuns(buffer, count: got, at: at)
            at += UInt64(got)
            try progress?(at)
            if fileSize == nil && got < want { break }
        }
        if fileSize == nil {
            // The stream must end within the volume.
            var probe: UInt8 = 0
            let n = read(fd, &probe, 1)
            if n > 0 { throw PoolError.invalidArgument("standard input holds more than the volume's \(volumeSize) bytes") }
        }
        return written
    }

    /// Reads up to `count` bytes for offset `at` (pread on a file, read on a stream),
    /// rounding a short final block up with zeros.
    private func fill(_ buffer: inout [UInt8], count: Int, at: UInt64) throws -> Int {
        var got = 0
        try buffer.withUnsafeMutableBytes { raw in
            while got < count {
                let n = fileSize != nil ? pread(fd, raw.baseAddress! + got, count - got, off_t(at + UInt64(got)))
                    : read(fd, raw.baseAddress! + got, count - got)
                if n < 0 && errno == EINTR { continue }
                if n < 0 { throw PoolError.io(errno: errno, operation: "read the raw image", byteOffset: at + UInt64(got)) }
                if n == 0 { break }
                got += n
            }
            let rounded = min((got + blockByteCount - 1) / blockByteCount * blockByteCount, raw.count)
            if rounded > got { UnsafeMutableRawBufferPointer(rebasing: raw[got..<rounded]).initializeMemory(as: UInt8.self, repeating: 0) }
            got = rounded
        }
        return got
    }

    /// Writes each run of blocks that are not all zeros; returns the bytes written.
    private func writeNonZeroRuns(_ buffer: [UInt8], count: Int, at: UInt64) throws -> UInt64 {
        var written: UInt64 = 0
        try buffer.withUnsafeBytes { raw in
            var runStart: Int? = nil
            func flush(_ upTo: Int) throws {
                guard let start = runStart else { return }
                try volume.write(at: at + UInt64(start), from: UnsafeRawBufferPointer(rebasing: raw[start..<upTo]))
                written += UInt64(upTo - start)
                runStart = nil
            }
            var offset = 0
            while offset < count {
                let block = UnsafeRawBufferPointer(rebasing: raw[offset..<(offset + blockByteCount)])
                if RawImporter.isZero(block) {
                    try flush(offset)
                } else if runStart == nil {
                    runStart = offset
                }
                offset += blockByteCount
            }
            try flush(count)
        }
        return written
    }

    static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        var i = 0
        let words = bytes.count / 8
        while i < words {
            if bytes.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self) != 0 { return false }
            i += 1
        }
        for j in (words * 8)..<bytes.count where bytes[j] != 0 { return false }
        return true
    }
}

extension Engine {
    /// Runs of mapped blocks and holes of `volume` inside `range` (within its size),
    /// clipped to it; subtrees outside the range are not visited.
    func extents(of volume: VolumeState, in range: Range<UInt64>) throws -> [VolumeExtent] {
        let bs = UInt64(blockByteCount)
        var result: [VolumeExtent] = []
        guard !range.isEmpty else { return result }
        func add(_ offset: UInt64, _ length: UInt64, _ mapped: Bool) {
            let start = max(offset, range.lowerBound), end = min(offset + length, range.upperBound)
            guard end > start else { return }
            if let last = result.last, last.isMapped == mapped, last.offset + last.length == start {
                result[result.count - 1].length += end - start
            } else {
                result.append(VolumeExtent(offset: start, length: end - start, isMapped: mapped))
            }
        }
        let map = volume.map
        let firstWanted = range.lowerBound / bs, endWanted = (range.upperBound + bs - 1) / bs
        func walk(_ node: TreeNode, firstBlock: UInt64) throws {
            if node.level == 0 {
                let words = try leafWords(node)
                let from = Int(max(firstWanted, firstBlock) - firstBlock)
                let to = Int(min(endWanted - firstBlock, UInt64(words.count)))
                guard from < to else { return }
                for i in from..<to { add((firstBlock + UInt64(i)) * bs, bs, words[i] != 0) }
                return
            }
            let span = map.span(level: node.level)
            for (i, child) in node.children.enumerated() {
                let start = firstBlock + UInt64(i) * span
                if start >= endWanted { break }
                if start + span <= firstWanted { continue }
                if let child {
                    try walk(child, firstBlock: start)
                } else {
                    add(start * bs, span * bs, false)
                }
            }
        }
        if let root = map.root { try walk(root, firstBlock: 0) }
        // The walk covers the range in order up to what the map reaches; the rest (no
        // root, or past the map's capacity) is a hole.
        let covered = result.last.map { $0.offset + $0.length } ?? range.lowerBound
        if covered < range.upperBound { add(covered, range.upperBound - covered, false) }
        return result
    }
}
