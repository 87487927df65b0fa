import LogPoolFormat

/// The one error type the public API throws. Every case carries enough context to say
/// what was wrong and where, without echoing user data.
public enum PoolError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A write needs `neededByteCount` bytes of new space; only `availableByteCount` could
    /// be made available (after checkpoint and compaction). Nothing was changed.
    /// `figures` names the admission rule that refused it and the pool's live, dead and
    /// reserved bytes at that moment (Specs/COMMIT.md §5.1).
    case poolFull(neededByteCount: UInt64, availableByteCount: UInt64, figures: SpaceFigures)
    /// A write to a snapshot or through a read-only pool handle.
    case readOnly(String)
    case notFound(String)
    case exists(String)
    /// An offset or length outside a volume.
    case outOfRange(String)
    /// A bad argument: a name, a size, a geometry.
    case invalidArgument(String)
    /// Bad bytes on disk: which structure, its file offset, expected vs found.
    case corrupt(structure: String, byteOffset: UInt64, detail: String)
    /// Another process holds the pool open.
    case inUse(String)
    /// A system call failed.
    case io(errno: Int32, operation: String, byteOffset: UInt64)
    /// An earlier write or sync failed; the handle refuses everything until reopened.
    case poisoned(String)
    /// The pool or volume handle was closed.
    case closed
    /// The file is a LogPool pool of another format version than this build reads
    /// (`supported`): an older LogPool created it (no migration yet), or a newer one.
    /// Nothing was read beyond its superblocks and nothing was written.
    case unsupportedFormat(version: UInt16, supported: UInt16)

    /// When no slot decodes: `unsupportedFormat` if an intact slot (of `versions`, the
    /// versions intact slots carry) is of another format than this build's, else nil.
    static func otherFormat(_ versions: [UInt16]) -> PoolError? {
        versions.filter { $0 != PoolGeometry.formatVersion }.max()
            .map { .unsupportedFormat(version: $0, supported: PoolGeometry.formatVersion) }
    }

    public init(_ corruption: CorruptionError) {
        self = .corrupt(structure: corruption.structure, byteOffset: corruption.byteOffset, detail: corruption.detail)
    }

    public var description: String {
        switch self {
        case .poolFull(let needed, let available, let figures):
            "pool full: need \(needed) bytes of new space, \(available) available (\(figures))"
        case .readOnly(let what): "read-only: \(what)"
        case .notFound(let name): "not found: \(name)"
        case .exists(let name): "already exists: \(name)"
        case .outOfRange(let what): "out of range: \(what)"
        case .invalidArgument(let what): "invalid argument: \(what)"
        case .corrupt(let structure, let offset, let detail): "corrupt \(structure) at byte offset \(offset): \(detail)"
        case .inUse(let what): "pool is in use: \(what)"
        case .io(let errno, let operation, let offset):
            "I/O error: \(operation) at byte offset \(offset) failed: \(String(cString: strerror(errno))) (errno \(errno))"
        case .poisoned(let cause): "pool handle failed earlier and must be reopened: \(cause)"
        case .closed: "pool is closed"
        case .unsupportedFormat(let version, let supported) where version < supported:
            "created by an older LogPool: pool format version \(version), this build reads version \(supported) and cannot convert it (open it with the LogPool that created it, export its volumes as raw images there and import them into a new pool)"
        case .unsupportedFormat(let version, let supported):
            "created by a newer LogPool: pool format version \(version), this build reads version \(supported)"
        }
    }
}

/// Why a write was refused with ``PoolError/poolFull(neededByteCount:availableByteCount:figures:)``.
public struct SpaceFigures: Sendable, Equatable, CustomStringConvertible {
    /// Which admission rule refused the write (Specs/COMMIT.md §5.1).
    public enum Rule: String, Sendable, Equatable {
        /// live data and metadata, the compaction reserve and the overwrite headroom
        /// leave less than the write's net new bytes; no compaction can help.
        case logical = "A-1"
        /// after checkpointing and compacting, the unwritten space (free segments,
        /// the open segment's rest and usable holes) is still short of the write's gross
        /// bytes plus the reserve.
        case physical = "A-2"
    }

    public var rule: Rule
    /// Referenced data blocks and the durable checkpoint's metadata.
    public var liveByteCount: UInt64
    /// Written bytes no state references (reclaimable by checkpoint and compaction).
    public var deadByteCount: UInt64
    /// The compaction reserve plus the overwrite headroom.
    public var reservedByteCount: UInt64

    public init(rule: Rule, liveByteCount: UInt64, deadByteCount: UInt64, reservedByteCount: UInt64) {
        self.rule = rule
        self.liveByteCount = liveByteCount
        self.deadByteCount = deadByteCount
        self.reservedByteCount = reservedByteCount
    }

    public var description: String {
        let why = rule == .logical
            ? "live data, metadata, reserve and headroom leave no room"
            : "unwritten space after checkpoint and compaction is short"
        return "rule \(rule.rawValue): \(why); live \(liveByteCount), dead \(deadByteCount), reserved \(reservedByteCount)"
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
