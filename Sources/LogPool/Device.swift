import LogPoolFormat

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The engine's only door to storage. ``FileDevice`` backs it with a file; the
/// `SimulatedDevice` of LogPoolTesting keeps an image in memory and can crash, tear and
/// drop unsynced writes. Errors are ``PoolError/io(errno:operation:byteOffset:)``.
public protocol BlockDevice: AnyObject {
    /// Current size of the backing store in bytes.
    func byteCount() throws -> UInt64
    /// Fills `buffer` completely or throws; a short read is an error.
    func read(into buffer: UnsafeMutableRawBufferPointer, at byteOffset: UInt64) throws
    /// Not durable until ``sync()`` returns.
    func write(_ bytes: UnsafeRawBufferPointer, at byteOffset: UInt64) throws
    /// Makes every completed write durable.
    func sync() throws
    /// True when reads, writes and syncs may run on several threads at once (a file:
    /// `pread`, `pwrite` and `fdatasync` are). The engine then reads and fsyncs outside
    /// the pool's lock (Specs/COMMIT.md §7); on other devices every call runs under it.
    /// Default: false.
    var allowsConcurrentAccess: Bool { get }
}

extension BlockDevice {
    public var allowsConcurrentAccess: Bool { false }

    func read(byteCount: Int, at byteOffset: UInt64) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: byteCount)
        try bytes.withUnsafeMutableBytes { try read(into: $0, at: byteOffset) }
        return bytes
    }

    func write(_ bytes: [UInt8], at byteOffset: UInt64) throws {
        try bytes.withUnsafeBytes { try write($0, at: byteOffset) }
    }
}

/// How a pool file is opened.
public enum OpenMode: Sendable {
    /// Exclusive lock; recovery may write.
    case readWrite
    /// Shared lock; nothing is ever written, recovery happens in memory only.
    case readOnly
}

/// A pool file. Holds a `flock` for as long as it is open: exclusive for read-write,
/// shared for read-only, so a second writer gets ``PoolError/inUse(_:)``.
public final class FileDevice: BlockDevice {
    public let path: String
    private var descriptor: Int32

    /// True when the descriptor is a block device (its size comes from `lseek`).
    private let isBlockDevice: Bool

    /// Opens (or with `create`, exclusively creates) `path`.
    ///
    /// Only a regular file or a block device is accepted: anything else (a FIFO, a
    /// directory, a socket, a character device) is ``PoolError/invalidArgument(_:)``, found
    /// without blocking (the open is non-blocking, so a FIFO with no writer cannot hang it).
    /// The descriptor is never 0, 1 or 2: with a standard stream closed, the pool would
    /// otherwise take its number, and a program reading "stdin" would read the pool file.
    public init(path: String, mode: OpenMode, create: Bool = false) throws {
        self.path = path
        var flags = mode == .readOnly ? O_RDONLY : O_RDWR
        flags |= O_CLOEXEC | O_NONBLOCK | O_NOCTTY
        if create { flags |= O_CREAT | O_EXCL }
        var fd = open(path, flags, 0o644)
        guard fd >= 0 else {
            let code = errno
            if code == EEXIST { throw PoolError.exists(path) }
            if code == ENOENT { throw PoolError.notFound(path) }
            if code == EISDIR { throw PoolError.invalidArgument("\(path) is a directory, not a pool file") }
            if code == ENXIO { throw PoolError.invalidArgument("\(path) is not a regular file or block device (a FIFO or socket)") }
            throw PoolError.io(errno: code, operation: "open \(path)", byteOffset: 0)
        }
        if fd <= STDERR_FILENO {
            let moved = fcntl(fd, F_DUPFD_CLOEXEC, STDERR_FILENO + 1)
            let code = errno
            close(fd)
            guard moved >= 0 else { throw PoolError.io(errno: code, operation: "move the descriptor of \(path) above 2", byteOffset: 0) }
            fd = moved
        }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            let code = errno
            close(fd)
            throw PoolError.io(errno: code, operation: "fstat \(path)", byteOffset: 0)
        }
        let type = info.st_mode & S_IFMT
        guard type == S_IFREG || type == S_IFBLK else {
            close(fd)
            let kind = switch type {
            case S_IFIFO: "a FIFO"
            case S_IFDIR: "a directory"
            case S_IFSOCK: "a socket"
            case S_IFCHR: "a character device"
            default: "not a regular file"
            }
            throw PoolError.invalidArgument("\(path) is \(kind); a pool is a regular file or a block device")
        }
        isBlockDevice = type == S_IFBLK
        // Blocking I/O from here on (O_NONBLOCK only kept the open from waiting).
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
        if flock(fd, (mode == .readOnly ? LOCK_SH : LOCK_EX) | LOCK_NB) != 0 {
            let code = errno
            close(fd)
            if code == EWOULDBLOCK {
                throw PoolError.inUse("\(path) is locked by another process")
            }
            throw PoolError.io(errno: code, operation: "flock \(path)", byteOffset: 0)
        }
        descriptor = fd
    }

    deinit { closeDescriptor() }

    /// Releases the lock and the descriptor; later calls fail with `EBADF`.
    public func closeDescriptor() {
        if descriptor >= 0 {
            close(descriptor)
            descriptor = -1
        }
    }

    public func byteCount() throws -> UInt64 {
        if isBlockDevice {
            let end = lseek(descriptor, 0, SEEK_END)
            guard end >= 0 else { throw PoolError.io(errno: errno, operation: "lseek to the end of \(path)", byteOffset: 0) }
            return UInt64(end)
        }
        var info = stat()
        guard fstat(descriptor, &info) == 0 else { throw PoolError.io(errno: errno, operation: "fstat", byteOffset: 0) }
        return UInt64(info.st_size)
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at byteOffset: UInt64) throws {
        var done = 0
        while done < buffer.count {
            let n = pread(descriptor, buffer.baseAddress! + done, buffer.count - done, off_t(byteOffset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw PoolError.io(errno: errno, operation: "read of \(buffer.count) bytes", byteOffset: byteOffset)
            }
            if n == 0 {
                throw PoolError.corrupt(structure: "pool file", byteOffset: byteOffset + UInt64(done),
                                        detail: "file ends before the \(buffer.count) bytes to read")
            }
            done += n
        }
    }

    public func write(_ bytes: UnsafeRawBufferPointer, at byteOffset: UInt64) throws {
        var done = 0
        while done < bytes.count {
            let n = pwrite(descriptor, bytes.baseAddress! + done, bytes.count - done, off_t(byteOffset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw PoolError.io(errno: errno, operation: "write of \(bytes.count) bytes", byteOffset: byteOffset)
            }
            done += n
        }
    }

    /// `pread`, `pwrite` and `fdatasync` on one descriptor are safe from many threads.
    public var allowsConcurrentAccess: Bool { true }

    public func sync() throws {
        if fdatasync(descriptor) != 0 {
            throw PoolError.io(errno: errno, operation: "fdatasync", byteOffset: 0)
        }
    }

    /// Sets the file length (pool creation only).
    func truncate(toByteCount byteCount: UInt64) throws {
        guard ftruncate(descriptor, off_t(byteCount)) == 0 else {
            throw PoolError.io(errno: errno, operation: "ftruncate to \(byteCount) bytes", byteOffset: 0)
        }
    }

    /// fsyncs the directory holding `path`, so a newly created file's name is durable.
    static func syncParentDirectory(of path: String) throws {
        var directory = path.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
        if directory.isEmpty { directory = path.hasPrefix("/") ? "/" : "." }
        let fd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw PoolError.io(errno: errno, operation: "open directory \(directory)", byteOffset: 0) }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw PoolError.io(errno: errno, operation: "fsync directory \(directory)", byteOffset: 0) }
    }
}
