/// Fixed layout constants and the geometry a pool is formatted with.
///
/// File layout (Specs/FORMAT.md §1):
///
///     [0, 512)          superblock slot A (slot index 0)
///     [4096, 4608)      superblock slot B (slot index 1), a different 4 KiB page
///     [8192, 8192+J)    journal ring of J bytes
///     [D, D+N*S)        N segments of S bytes; D = journal end rounded up to 4096
///     [D+N*S, capacity) unused tail (less than one segment)
public struct PoolGeometry: Sendable, Equatable {
    /// Version 2 (issue "engine at scale"): the checkpoint root records where appends
    /// stopped, so a clean open reads no block-table leaf. Version 3: refcounts are
    /// stored in a tree of their own (FORMAT §5.4) instead of derived from every map
    /// leaf at open. Version 4: the root also records the live block count, so the
    /// counts are paged (read on use) and open reads no refcount leaf. Older versions are refused.
    public static let formatVersion: UInt16 = 4
    public static let sectorByteCount = 512
    /// What each fsync's writes are padded or aligned to, so that nothing written after a
    /// sync shares a 4 KiB physical sector with what the sync made durable.
    public static let durableAlignmentByteCount = 4096
    public static let superblockByteCount = 512
    public static let superblockSlotByteOffsets: [UInt64] = [0, 4096]
    public static let journalByteOffset: UInt64 = 8192
    /// Metadata pages (map and block-table tree nodes) are always this size.
    public static let pageByteCount = 4096
    /// Every segment starts with its header (one sector, ``SegmentHeaderLayout``) in a
    /// page of its own, so that the payload starts page aligned: uncompressed blocks and
    /// metadata pages are then page aligned in the file, and a 4 KiB read or write
    /// touches one page-cache page, not two.
    public static let segmentHeaderByteCount = 4096
    public static let blockByteCountRange: ClosedRange<UInt32> = 512...65536
    public static let segmentByteCountMin: UInt32 = 64 * 1024
    public static let segmentByteCountMax: UInt32 = 256 * 1024 * 1024
    public static let reserveSegmentCountDefault: UInt32 = 2
    public static let capacityByteCountMin: UInt64 = 4 << 20
    /// Largest volume (2^50 bytes = 1 PiB).
    public static let volumeByteCountMax: UInt64 = 1 << 50
    /// Generations, sequences and volume ids stay below this, so `+ 1` never overflows.
    public static let counterMax: UInt64 = 1 << 62
    public static let journalByteCountMin: UInt64 = 256 * 1024

    public var capacityByteCount: UInt64
    public var blockByteCount: UInt32
    public var segmentByteCount: UInt32
    public var segmentCount: UInt32
    public var journalByteCount: UInt64
    public var dataAreaByteOffset: UInt64
    public var reserveSegmentCount: UInt32

    public init(
        capacityByteCount: UInt64, blockByteCount: UInt32, segmentByteCount: UInt32,
        segmentCount: UInt32, journalByteCount: UInt64, dataAreaByteOffset: UInt64,
        reserveSegmentCount: UInt32
    ) {
        self.capacityByteCount = capacityByteCount
        self.blockByteCount = blockByteCount
        self.segmentByteCount = segmentByteCount
        self.segmentCount = segmentCount
        self.journalByteCount = journalByteCount
        self.dataAreaByteOffset = dataAreaByteOffset
        self.reserveSegmentCount = reserveSegmentCount
    }

    /// The default segment size for a pool of `capacityByteCount`: 1/64 of it, a power of
    /// two between 64 KiB and 4 MiB (small pools get small segments so the reserve and
    /// the compactor's slack stay a small fraction).
    /// Larger pools get larger segments still when their usage table (8 bytes per
    /// segment in every checkpoint root) would not fit half a segment.
    public static func defaultSegmentByteCount(capacityByteCount: UInt64) -> UInt32 {
        var size: UInt64 = 64 * 1024
        while size * 2 <= capacityByteCount / 64 && size < 4 * 1024 * 1024 { size *= 2 }
        while (capacityByteCount / size) * 8 + 4096 > (size - UInt64(segmentHeaderByteCount)) / 2
            && size < UInt64(segmentByteCountMax) { size *= 2 }
        return UInt32(size)
    }

    /// The journal ring size for a pool: 1/128 of capacity, 256 KiB to 64 MiB, 4 KiB aligned.
    public static func defaultJournalByteCount(capacityByteCount: UInt64) -> UInt64 {
        let wanted = (capacityByteCount / 128) & ~UInt64(4095)
        return min(max(wanted, 256 * 1024), 64 * 1024 * 1024)
    }

    /// Lays out a new pool, or says which parameter is unusable.
    public static func make(
        capacityByteCount: UInt64, blockByteCount: UInt32, segmentByteCount: UInt32?
    ) -> Result<PoolGeometry, GeometryError> {
        guard blockByteCountRange.contains(blockByteCount), blockByteCount.nonzeroBitCount == 1 else {
            return .failure(.init("block size \(blockByteCount) must be a power of two from 512 to 65536"))
        }
        let segment = segmentByteCount ?? max(
            defaultSegmentByteCount(capacityByteCount: capacityByteCount), 16 * blockByteCount)
        guard segment.nonzeroBitCount == 1, segment >= segmentByteCountMin, segment <= segmentByteCountMax else {
            return .failure(.init("segment size \(segment) must be a power of two from 64 KiB to 256 MiB"))
        }
        guard segment >= 16 * blockByteCount else {
            return .failure(.init("segment size \(segment) must hold at least 16 blocks of \(blockByteCount) bytes"))
        }
        // Below 4 MiB the reserve and the 1 MiB overwrite headroom leave nothing useful.
        guard capacityByteCount >= 4 << 20 else {
            return .failure(.init("pool size \(capacityByteCount) is too small: the smallest pool is 4 MiB"))
        }
        let journal = defaultJournalByteCount(capacityByteCount: capacityByteCount)
        let dataArea = (journalByteOffset + journal + 4095) & ~UInt64(4095)
        let reserve = reserveSegmentCountDefault
        let minimumSegments = UInt64(reserve) + 4
        guard capacityByteCount >= dataArea + minimumSegments * UInt64(segment) else {
            let needed = dataArea + minimumSegments * UInt64(segment)
            return .failure(.init(
                "pool size \(capacityByteCount) is too small: need at least \(needed) bytes for segments of \(segment) bytes"))
        }
        let count = (capacityByteCount - dataArea) / UInt64(segment)
        guard count <= UInt64(UInt32.max) else {
            return .failure(.init("pool size \(capacityByteCount) needs more than 2^32 segments; use larger segments"))
        }
        // The checkpoint root carries 8 bytes per segment and must fit one segment with
        // room for the volume table.
        guard count * 8 + 4096 <= (UInt64(segment) - UInt64(segmentHeaderByteCount)) / 2 else {
            return .failure(.init("\(count) segments of \(segment) bytes: too many for one segment's checkpoint; use larger segments"))
        }
        return .success(PoolGeometry(
            capacityByteCount: capacityByteCount, blockByteCount: blockByteCount,
            segmentByteCount: segment, segmentCount: UInt32(count), journalByteCount: journal,
            dataAreaByteOffset: dataArea, reserveSegmentCount: reserve))
    }

    public var dataAreaEndByteOffset: UInt64 {
        dataAreaByteOffset + UInt64(segmentCount) * UInt64(segmentByteCount)
    }

    public func segmentByteOffset(_ segmentIndex: Int) -> UInt64 {
        precondition(segmentIndex >= 0 && segmentIndex < Int(segmentCount), "segment index \(segmentIndex) out of range")
        return dataAreaByteOffset + UInt64(segmentIndex) * UInt64(segmentByteCount)
    }

    /// The segment that holds `byteOffset`, or nil when it lies outside the data area.
    public func segmentIndex(containing byteOffset: UInt64) -> Int? {
        guard byteOffset >= dataAreaByteOffset, byteOffset < dataAreaEndByteOffset else { return nil }
        return Int((byteOffset - dataAreaByteOffset) / UInt64(segmentByteCount))
    }

    /// True when [byteOffset, byteOffset+byteCount) lies in one segment's payload (after
    /// its header page) and starts on a sector boundary: the only places records live.
    public func isValidExtent(byteOffset: UInt64, byteCount: UInt64) -> Bool {
        guard byteCount > 0, byteOffset % UInt64(Self.sectorByteCount) == 0,
            let segment = segmentIndex(containing: byteOffset)
        else { return false }
        let start = segmentByteOffset(segment)
        let (end, overflow) = byteOffset.addingReportingOverflow(byteCount)
        return !overflow && byteOffset >= start + UInt64(Self.segmentHeaderByteCount)
            && end <= start + UInt64(segmentByteCount)
    }

    public var segmentPayloadByteCount: UInt64 {
        UInt64(segmentByteCount) - UInt64(Self.segmentHeaderByteCount)
    }
}

public struct GeometryError: Error, Equatable, Sendable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// Rounds `byteCount` up to whole sectors.
@inlinable
public func sectorAligned(_ byteCount: UInt64) -> UInt64 {
    (byteCount + 511) & ~UInt64(511)
}
