/// A pointer to a metadata page: where it is and what its checksum must be.
public struct PagePointer: Sendable, Equatable, Hashable {
    /// Byte offset of the page in the pool file; 0 = no page (an empty subtree).
    public var byteOffset: UInt64
    public var checksum: UInt64

    public static let none = PagePointer(byteOffset: 0, checksum: 0)

    public init(byteOffset: UInt64, checksum: UInt64) {
        self.byteOffset = byteOffset
        self.checksum = checksum
    }

    public var isNone: Bool { byteOffset == 0 }
}

/// One row of the checkpoint's volume table.
public struct VolumeRecord: Sendable, Equatable {
    public var id: UInt64
    public var kind: VolumeKind
    public var name: String
    public var sizeByteCount: UInt64
    public var createdTime: Int64
    /// The volume or snapshot this one was snapshotted or cloned from; 0 = none.
    public var originID: UInt64
    public var mapRoot: PagePointer
    /// Levels in the map tree (1 = the root is a leaf).
    public var mapHeight: Int

    public init(id: UInt64, kind: VolumeKind, name: String, sizeByteCount: UInt64, createdTime: Int64,
                originID: UInt64, mapRoot: PagePointer, mapHeight: Int) {
        self.id = id
        self.kind = kind
        self.name = name
        self.sizeByteCount = sizeByteCount
        self.createdTime = createdTime
        self.originID = originID
        self.mapRoot = mapRoot
        self.mapHeight = mapHeight
    }
}

/// One row of the checkpoint's release queue (FORMAT §6, C-11): the map of a deleted
/// volume or snapshot whose blocks are still being released, in bounded steps.
public struct QueuedMapRecord: Sendable, Equatable {
    /// The deleted volume's id (never reused: below nextVolumeID, unique).
    public var id: UInt64
    public var mapRoot: PagePointer
    public var mapHeight: Int
    /// Slots below this are released already; the next step starts here.
    public var releasedSlotCount: UInt64

    public init(id: UInt64, mapRoot: PagePointer, mapHeight: Int, releasedSlotCount: UInt64) {
        self.id = id
        self.mapRoot = mapRoot
        self.mapHeight = mapHeight
        self.releasedSlotCount = releasedSlotCount
    }

    /// The encoded length of one queue row.
    public static let byteCount = 40
}

/// The checkpoint root: everything a superblock points at (Specs/FORMAT.md §6). The
/// trees it names are written before it, and it is written before the superblock.
public struct CheckpointRoot: Sendable, Equatable {
    public static let magic: [UInt8] = Array("LPCKPT".utf8) + [0, 4]
    public static let headerByteCount = 112

    public var generation: UInt64
    public var nextVolumeID: UInt64
    public var blockTableRoot: PagePointer
    public var blockTableHeight: Int
    /// Block ids 1..<blockIDLimit have block-table slots; id 0 means "unmapped".
    public var blockIDLimit: UInt64
    public var volumes: [VolumeRecord]
    /// Live bytes per segment (data blocks, this checkpoint's pages and this root).
    public var segmentLiveByteCounts: [UInt64]
    /// Where appends stopped when this root was written: the open segment's append point
    /// rounded up to 4 KiB, from which to the segment's end nothing this state references
    /// lies; 0 when no segment was open or it was full (C-8).
    public var resumeByteOffset: UInt64
    /// The refcount tree (FORMAT §5.4): the count of map leaves naming each block id
    /// below `blockIDLimit`, two per leaf word; a missing subtree counts zero.
    public var refcountRoot: PagePointer
    public var refcountHeight: Int
    /// Block ids with a nonzero count in the refcount tree (C-10: below `blockIDLimit`):
    /// kept so that open reads no refcount leaf (the counts are paged, FORMAT §5.4).
    public var liveBlockCount: UInt64
    /// Maps of deleted volumes whose blocks are not all released yet (C-11).
    public var releaseQueue: [QueuedMapRecord]

    public init(generation: UInt64, nextVolumeID: UInt64, blockTableRoot: PagePointer, blockTableHeight: Int,
                blockIDLimit: UInt64, volumes: [VolumeRecord], segmentLiveByteCounts: [UInt64],
                resumeByteOffset: UInt64 = 0, refcountRoot: PagePointer = .none, refcountHeight: Int = 1,
                liveBlockCount: UInt64 = 0, releaseQueue: [QueuedMapRecord] = []) {
        self.generation = generation
        self.nextVolumeID = nextVolumeID
        self.blockTableRoot = blockTableRoot
        self.blockTableHeight = blockTableHeight
        self.blockIDLimit = blockIDLimit
        self.volumes = volumes
        self.segmentLiveByteCounts = segmentLiveByteCounts
        self.resumeByteOffset = resumeByteOffset
        self.refcountRoot = refcountRoot
        self.refcountHeight = refcountHeight
        self.liveBlockCount = liveBlockCount
        self.releaseQueue = releaseQueue
    }

    /// The refcount tree height that covers `blockIDLimit` ids.
    public static func refcountHeight(coveringBlockIDLimit limit: UInt64) -> Int {
        PageLayout.height(kind: .refcounts, coveringSlotCount: (limit + 1) / 2)
    }

    /// Encoded length before sector padding (independent of the usage values, so the
    /// root's own extent can be planned before the usage table is final).
    public var unpaddedByteCount: Int {
        Self.unpaddedByteCount(volumeRowByteTotal: volumes.reduce(0) { $0 + Self.volumeRowByteCount(name: $1.name) },
                               segmentCount: segmentLiveByteCounts.count, queueCount: releaseQueue.count)
    }

    /// The encoded length of one volume row (58 bytes and the name).
    public static func volumeRowByteCount(name: String) -> Int { 56 + 2 + name.utf8.count }

    /// ``unpaddedByteCount`` of a root whose volume rows take `volumeRowByteTotal` bytes,
    /// without building it.
    public static func unpaddedByteCount(volumeRowByteTotal: Int, segmentCount: Int, queueCount: Int = 0) -> Int {
        headerByteCount + volumeRowByteTotal + queueCount * QueuedMapRecord.byteCount + segmentCount * 8 + 8
    }

    public var encodedByteCount: Int { Int(sectorAligned(UInt64(unpaddedByteCount))) }

    public func encode(salt: UInt64) -> (bytes: [UInt8], checksum: UInt64) {
        var w = ByteWriter(capacity: encodedByteCount)
        w.append(Self.magic)
        w.u64(UInt64(encodedByteCount))
        w.u64(generation)
        w.u64(nextVolumeID)
        w.u64(blockTableRoot.byteOffset)
        w.u64(blockTableRoot.checksum)
        w.u32(UInt32(blockTableHeight))
        w.u32(UInt32(volumes.count))
        w.u64(blockIDLimit)
        w.u32(UInt32(segmentLiveByteCounts.count))
        w.u32(UInt32(releaseQueue.count))
        w.u64(resumeByteOffset)
        w.u64(refcountRoot.byteOffset)
        w.u64(refcountRoot.checksum)
        w.u32(UInt32(refcountHeight))
        w.u32(0)
        w.u64(liveBlockCount)
        assert(w.byteCount == Self.headerByteCount)
        for v in volumes {
            w.u64(v.id); w.u8(v.kind.rawValue); w.u8(0); w.u16(UInt16(v.mapHeight)); w.u32(0)
            w.u64(v.sizeByteCount); w.i64(v.createdTime); w.u64(v.originID)
            w.u64(v.mapRoot.byteOffset); w.u64(v.mapRoot.checksum)
            w.string(v.name)
        }
        for q in releaseQueue {
            w.u64(q.id); w.u16(UInt16(q.mapHeight)); w.u16(0); w.u32(0)
            w.u64(q.mapRoot.byteOffset); w.u64(q.mapRoot.checksum); w.u64(q.releasedSlotCount)
        }
        for used in segmentLiveByteCounts { w.u64(used) }
        w.zeros(encodedByteCount - 8 - w.byteCount)
        let sum = Checksum.xxh3(w.bytes, seed: salt)
        w.u64(sum)
        return (w.bytes, sum)
    }

    /// Decodes a checkpoint root read from `byteOffset`. Checks the checksum against the
    /// superblock's `expectedChecksum`, then every count against the bytes present before
    /// allocating, then every pointer against `geometry`. Never traps.
    public static func decode(
        _ bytes: [UInt8], expectedChecksum: UInt64, salt: UInt64, byteOffset: UInt64, geometry: PoolGeometry
    ) throws(CorruptionError) -> CheckpointRoot {
        var r = ByteReader(bytes, structure: "checkpoint", baseByteOffset: byteOffset)
        guard bytes.count >= headerByteCount + 8, bytes.count % PoolGeometry.sectorByteCount == 0 else {
            throw r.error("size \(bytes.count) is not a whole number of sectors holding a header")
        }
        let stored = bytes.withUnsafeBytes { $0.loadLE(UInt64.self, at: bytes.count - 8) }
        let computed = Checksum.xxh3(bytes[0..<(bytes.count - 8)], seed: salt)
        guard stored == computed else {
            throw r.error("checksum mismatch: stored \(hex(stored)), computed \(hex(computed))", at: bytes.count - 8)
        }
        guard computed == expectedChecksum else {
            throw r.error("checksum \(hex(computed)) differs from the superblock's \(hex(expectedChecksum)) (stale checkpoint)", at: bytes.count - 8)
        }
        guard try r.raw(8, "magic") == magic else { throw r.error("bad magic", at: 0) }
        let declared = try r.u64("size")
        guard declared == UInt64(bytes.count) else { throw r.error("declares \(declared) bytes, superblock says \(bytes.count)", at: 8) }
        let generation = try r.u64("generation")
        let nextVolumeIDAt = r.position
        let nextVolumeID = try r.u64("next volume id")
        guard nextVolumeID >= 1, nextVolumeID < PoolGeometry.counterMax else {
            throw r.error("next volume id \(nextVolumeID) is out of range", at: nextVolumeIDAt)
        }
        let btRoot = PagePointer(byteOffset: try r.u64("block-table root"), checksum: try r.u64("block-table root checksum"))
        let btHeightAt = r.position
        let btHeight = Int(try r.u32("block-table height"))
        let volumeCount = Int(try r.u32("volume count"))
        let blockIDLimitAt = r.position
        let blockIDLimit = try r.u64("block id limit")
        let segmentCountAt = r.position
        let segmentCount = Int(try r.u32("segment count"))
        let queueCountAt = r.position
        let queueCount = Int(try r.u32("release queue count"))
        let resumeAt = r.position
        let resume = try r.u64("resume byte offset")
        if resume != 0 {
            // C-8: inside a segment, past its header page, on a 4 KiB boundary, short of its end.
            let unit = UInt64(PoolGeometry.durableAlignmentByteCount)
            guard resume % unit == 0, let s = geometry.segmentIndex(containing: resume),
                  resume >= geometry.segmentByteOffset(s) + UInt64(PoolGeometry.segmentHeaderByteCount)
            else {
                throw r.error("resume byte offset \(resume) is not a 4 KiB boundary inside a segment past its header", at: resumeAt)
            }
        }
        let refcountRoot = PagePointer(byteOffset: try r.u64("refcount root"), checksum: try r.u64("refcount root checksum"))
        let refcountHeightAt = r.position
        let refcountHeight = Int(try r.u32("refcount tree height"))
        guard try r.u32("reserved") == 0 else { throw r.error("reserved field is not zero", at: r.position - 4) }
        let liveAt = r.position
        let liveBlockCount = try r.u64("live block count")
        guard btHeight >= 1, btHeight <= PageLayout.heightMax else {
            throw r.error("block-table height \(btHeight) outside 1...\(PageLayout.heightMax)", at: btHeightAt)
        }
        guard blockIDLimit >= 1, blockIDLimit <= PageLayout.capacity(kind: .blockTable, height: btHeight) else {
            throw r.error("block id limit \(blockIDLimit) does not fit a block table of height \(btHeight)", at: blockIDLimitAt)
        }
        guard segmentCount == Int(geometry.segmentCount) else {
            throw r.error("segment count \(segmentCount), superblock says \(geometry.segmentCount)", at: segmentCountAt)
        }
        // C-9: the refcount tree covers every id below the limit.
        guard refcountHeight >= 1, refcountHeight <= PageLayout.heightMax,
              PageLayout.capacity(kind: .refcounts, height: refcountHeight) >= (blockIDLimit + 1) / 2
        else {
            throw r.error("refcount tree height \(refcountHeight) outside 1...\(PageLayout.heightMax) or too low for block id limit \(blockIDLimit)", at: refcountHeightAt)
        }
        // C-10: id 0 is never live, so at most limit - 1 ids are.
        guard liveBlockCount < blockIDLimit else {
            throw r.error("live block count \(liveBlockCount) is not below the block id limit \(blockIDLimit)", at: liveAt)
        }
        try checkPointer(btRoot, geometry: geometry, &r, what: "block-table root")
        try checkPointer(refcountRoot, geometry: geometry, &r, what: "refcount root")
        // 58 bytes is the smallest volume row: refuse counts the buffer cannot hold.
        guard volumeCount <= r.remainingByteCount / 58 else {
            throw r.error("volume count \(volumeCount) exceeds what \(bytes.count) bytes can hold", at: 52)
        }
        var volumes: [VolumeRecord] = []
        volumes.reserveCapacity(volumeCount)
        var seenIDs = Set<UInt64>(), seenNames = Set<String>()
        for _ in 0..<volumeCount {
            let rowAt = r.position
            let id = try r.u64("volume id")
            guard let kind = VolumeKind(rawValue: try r.u8("volume kind")) else { throw r.error("unknown volume kind", at: rowAt + 8) }
            guard try r.u8("reserved") == 0 else { throw r.error("reserved byte is not zero", at: rowAt + 9) }
            let height = Int(try r.u16("map height"))
            guard try r.u32("reserved") == 0 else { throw r.error("reserved field is not zero", at: rowAt + 12) }
            let size = try r.u64("volume size")
            let created = try r.i64("created time")
            let origin = try r.u64("origin id")
            let root = PagePointer(byteOffset: try r.u64("map root"), checksum: try r.u64("map root checksum"))
            let name = try r.string("volume name")
            guard id >= 1, id < nextVolumeID, seenIDs.insert(id).inserted else {
                throw r.error("volume id \(id) is zero, duplicated or not below next id \(nextVolumeID)", at: rowAt)
            }
            guard seenNames.insert(name).inserted else { throw r.error("duplicate volume name \"\(name)\"", at: rowAt) }
            guard size % UInt64(geometry.blockByteCount) == 0, size <= PoolGeometry.volumeByteCountMax else {
                throw r.error("volume size \(size) is not a multiple of the block size up to \(PoolGeometry.volumeByteCountMax)", at: rowAt + 16)
            }
            guard height >= 1, height <= mapHeightMax(geometry),
                  PageLayout.capacity(kind: .map, height: height) >= blockCount(size, geometry)
            else { throw r.error("map height \(height) cannot address volume size \(size), or exceeds \(mapHeightMax(geometry)) (the height of the largest volume)", at: rowAt + 10) }
            try checkPointer(root, geometry: geometry, &r, what: "map root of volume \(id)")
            volumes.append(VolumeRecord(id: id, kind: kind, name: name, sizeByteCount: size, createdTime: created,
                                        originID: origin, mapRoot: root, mapHeight: height))
        }
        // C-11: queued maps of deleted volumes.
        guard queueCount <= r.remainingByteCount / QueuedMapRecord.byteCount else {
            throw r.error("release queue count \(queueCount) exceeds what \(bytes.count) bytes can hold", at: queueCountAt)
        }
        var releaseQueue: [QueuedMapRecord] = []
        releaseQueue.reserveCapacity(queueCount)
        for _ in 0..<queueCount {
            let rowAt = r.position
            let id = try r.u64("queued map id")
            let height = Int(try r.u16("queued map height"))
            guard try r.u16("reserved") == 0, try r.u32("reserved") == 0 else { throw r.error("reserved field is not zero", at: rowAt + 10) }
            let root = PagePointer(byteOffset: try r.u64("queued map root"), checksum: try r.u64("queued map root checksum"))
            let released = try r.u64("released slot count")
            guard id >= 1, id < nextVolumeID, seenIDs.insert(id).inserted else {
                throw r.error("queued map id \(id) is zero, duplicated or not below next id \(nextVolumeID)", at: rowAt)
            }
            guard height >= 1, height <= mapHeightMax(geometry) else {
                throw r.error("queued map height \(height) outside 1...\(mapHeightMax(geometry))", at: rowAt + 8)
            }
            guard !root.isNone else { throw r.error("queued map \(id) has no root", at: rowAt + 16) }
            guard released < PageLayout.capacity(kind: .map, height: height) else {
                throw r.error("queued map \(id) released \(released) slots, not below its \(PageLayout.capacity(kind: .map, height: height))", at: rowAt + 32)
            }
            try checkPointer(root, geometry: geometry, &r, what: "root of queued map \(id)")
            releaseQueue.append(QueuedMapRecord(id: id, mapRoot: root, mapHeight: height, releasedSlotCount: released))
        }
        var usage: [UInt64] = []
        try r.require(segmentCount * 8, for: "segment usage table")
        usage.reserveCapacity(segmentCount)
        for _ in 0..<segmentCount { usage.append(try r.u64("segment usage")) }
        // Exactly the encoder's length: zero padding to 8 bytes before a sector boundary.
        let end = r.position
        guard sectorAligned(UInt64(end + 8)) == UInt64(bytes.count) else {
            throw r.error("\(bytes.count) bytes, but the contents end at \(end): only zero padding up to the next sector may follow", at: end)
        }
        if let nonzero = bytes[end..<(bytes.count - 8)].firstIndex(where: { $0 != 0 }) {
            throw r.error("padding byte is not zero", at: nonzero)
        }
        return CheckpointRoot(generation: generation, nextVolumeID: nextVolumeID, blockTableRoot: btRoot,
                              blockTableHeight: btHeight, blockIDLimit: blockIDLimit, volumes: volumes,
                              segmentLiveByteCounts: usage, resumeByteOffset: resume,
                              refcountRoot: refcountRoot, refcountHeight: refcountHeight,
                              liveBlockCount: liveBlockCount, releaseQueue: releaseQueue)
    }

    /// The height a map of the largest volume (2^50 bytes) needs: maps only grow as far
    /// as their volume's size needs, and the bound keeps every slot index of a map
    /// (fanout x span) inside 64 bits (C-2).
    public static func mapHeightMax(_ geometry: PoolGeometry) -> Int {
        PageLayout.height(kind: .map, coveringSlotCount: PoolGeometry.volumeByteCountMax / UInt64(geometry.blockByteCount))
    }

    private static func blockCount(_ size: UInt64, _ geometry: PoolGeometry) -> UInt64 {
        let block = UInt64(geometry.blockByteCount)
        return size / block + (size % block == 0 ? 0 : 1)
    }

    private static func checkPointer(_ p: PagePointer, geometry: PoolGeometry, _ r: inout ByteReader, what: String) throws(CorruptionError) {
        guard p.isNone || geometry.isValidExtent(byteOffset: p.byteOffset, byteCount: UInt64(PoolGeometry.pageByteCount)) else {
            throw r.error("\(what) points outside every segment (byte offset \(p.byteOffset))")
        }
    }
}
