/// Metadata pages: the nodes of the copy-on-write trees that hold volume maps and the
/// block table (Specs/FORMAT.md §5). Every page is 4096 bytes:
///
///     [0, 4)      magic "LPPG"
///     [4, 5)      kind: 1 map, 2 block table, 3 refcounts
///     [5, 6)      level: 0 leaf, 1... interior
///     [6, 8)      reserved, zero
///     [8, 12)     slot count (the fanout for this kind and level)
///     [12, 16)    reserved, zero
///     [16, 4088)  slots (8-byte words, little-endian)
///     [4088, 4096) XXH3-64 (seed: pool salt) of [0, 4088)
///
/// The parent pointer to a page carries the same checksum, so a page that is internally
/// valid but stale or misdirected is still rejected.
public enum PageKind: UInt8, Sendable {
    case map = 1
    case blockTable = 2
    /// The stored refcounts (Specs/FORMAT.md §5.4): each leaf word holds the counts of
    /// two block ids, the even one in its low 32 bits.
    case refcounts = 3

    /// How findings and errors name a page of this kind.
    public var pageName: String {
        switch self {
        case .map: "map page"
        case .blockTable: "block-table page"
        case .refcounts: "refcount page"
        }
    }
}

public enum PageLayout {
    public static let magic: UInt32 = 0x4750_504C  // "LPPG"
    public static let headerByteCount = 16
    public static let checksumOffset = PoolGeometry.pageByteCount - 8
    public static let wordCapacity = (checksumOffset - headerByteCount) / 8  // 509
    /// Words per interior slot: child byte offset, child checksum.
    public static let interiorWordsPerSlot = 2
    public static let interiorFanout = wordCapacity / 2  // 254
    public static let mapLeafFanout = wordCapacity  // 509 block ids
    /// Words per block-table slot: byte offset, stored size | flags << 32, checksum.
    public static let blockTableWordsPerSlot = 3
    public static let blockTableLeafFanout = wordCapacity / 3  // 169
    /// Block ids per refcount leaf: two 32-bit counts per word.
    public static let refcountsPerLeaf = 2 * wordCapacity  // 1018
    /// Deeper trees are rejected: 8 levels address far more than 2^64 entries.
    public static let heightMax = 8

    public static func wordsPerSlot(kind: PageKind, level: Int) -> Int {
        level > 0 ? interiorWordsPerSlot : (kind == .blockTable ? blockTableWordsPerSlot : 1)
    }

    public static func fanout(kind: PageKind, level: Int) -> Int {
        level > 0 ? interiorFanout : (kind == .blockTable ? blockTableLeafFanout : wordCapacity)
    }

    /// The child pointers of an interior page's words (offset and checksum per slot;
    /// `.none` for an empty slot).
    public static func childPointers(_ words: [UInt64]) -> [PagePointer] {
        stride(from: 0, to: words.count - 1, by: 2).map { PagePointer(byteOffset: words[$0], checksum: words[$0 + 1]) }
    }

    /// The first leaf slot covered by child `index` of a node at `level` (≥ 1) whose own
    /// first slot is `base`, saturating at UInt64.max (a crafted tree's slots only have to
    /// stay distinct and in range, never wrap).
    public static func childBase(_ base: UInt64, index: Int, kind: PageKind, level: Int) -> UInt64 {
        let (offset, overflow1) = UInt64(index).multipliedReportingOverflow(by: capacity(kind: kind, height: level))
        let (sum, overflow2) = base.addingReportingOverflow(offset)
        return overflow1 || overflow2 ? .max : sum
    }

    /// Number of leaf slots a tree of `height` levels (1 = a single leaf) addresses,
    /// saturating at UInt64.max. Table lookup: this is on every read's path.
    @inline(__always)
    public static func capacity(kind: PageKind, height: Int) -> UInt64 {
        let h = max(height, 1)
        if h <= heightMax { return kind == .blockTable ? blockTableCapacities[h] : mapCapacities[h] }
        return computedCapacity(kind: kind, height: h)
    }

    private static let mapCapacities: [UInt64] = (0...heightMax).map { computedCapacity(kind: .map, height: max($0, 1)) }
    private static let blockTableCapacities: [UInt64] = (0...heightMax).map { computedCapacity(kind: .blockTable, height: max($0, 1)) }

    private static func computedCapacity(kind: PageKind, height: Int) -> UInt64 {
        var total = UInt64(fanout(kind: kind, level: 0))
        for _ in 1..<max(height, 1) {
            let (product, overflow) = total.multipliedReportingOverflow(by: UInt64(interiorFanout))
            if overflow { return .max }
            total = product
        }
        return total
    }

    /// The smallest height whose capacity covers `slotCount` leaf slots.
    public static func height(kind: PageKind, coveringSlotCount slotCount: UInt64) -> Int {
        var height = 1
        while capacity(kind: kind, height: height) < slotCount { height += 1 }
        return height
    }

    /// Encodes a page. `words` holds exactly `fanout * wordsPerSlot` words.
    public static func encode(kind: PageKind, level: Int, words: [UInt64], salt: UInt64) -> (bytes: [UInt8], checksum: UInt64) {
        let slots = fanout(kind: kind, level: level)
        precondition(words.count == slots * wordsPerSlot(kind: kind, level: level), "page word count")
        var w = ByteWriter(capacity: PoolGeometry.pageByteCount)
        w.u32(magic)
        w.u8(kind.rawValue)
        w.u8(UInt8(level))
        w.u16(0)
        w.u32(UInt32(slots))
        w.u32(0)
        for word in words { w.u64(word) }
        w.zeros(checksumOffset - w.byteCount)
        let sum = Checksum.xxh3(w.bytes, seed: salt)
        w.u64(sum)
        return (w.bytes, sum)
    }

    /// Decodes a page read from `byteOffset`, checking it against the parent's
    /// `expectedChecksum` and the expected kind and level. Never traps.
    public static func decode(
        _ bytes: [UInt8], kind: PageKind, level: Int, expectedChecksum: UInt64, salt: UInt64, byteOffset: UInt64
    ) throws(CorruptionError) -> [UInt64] {
        let name = kind.pageName
        func fail(_ offset: Int, _ detail: String) -> CorruptionError {
            CorruptionError(name, at: byteOffset + UInt64(offset), detail)
        }
        guard bytes.count == PoolGeometry.pageByteCount else {
            throw fail(0, "truncated: \(bytes.count) of \(PoolGeometry.pageByteCount) bytes")
        }
        return try bytes.withUnsafeBytes { raw in Result { () throws(CorruptionError) -> [UInt64] in
            let stored = raw.loadLE(UInt64.self, at: checksumOffset)
            let computed = Checksum.xxh3(UnsafeRawBufferPointer(rebasing: raw[0..<checksumOffset]), seed: salt)
            guard stored == computed else {
                throw fail(checksumOffset, "checksum mismatch: stored \(hex(stored)), computed \(hex(computed))")
            }
            guard computed == expectedChecksum else {
                throw fail(checksumOffset, "page checksum \(hex(computed)) differs from its parent's pointer \(hex(expectedChecksum)) (stale or misdirected page)")
            }
            guard raw.loadLE(UInt32.self, at: 0) == magic else { throw fail(0, "bad magic") }
            guard raw[4] == kind.rawValue else { throw fail(4, "page kind \(raw[4]), expected \(kind.rawValue)") }
            guard Int(raw[5]) == level else { throw fail(5, "page level \(raw[5]), expected \(level)") }
            guard raw.loadLE(UInt16.self, at: 6) == 0, raw.loadLE(UInt32.self, at: 12) == 0 else {
                throw fail(6, "reserved bytes are not zero")
            }
            let slots = Int(raw.loadLE(UInt32.self, at: 8))
            guard slots == fanout(kind: kind, level: level) else {
                throw fail(8, "slot count \(slots), expected \(fanout(kind: kind, level: level))")
            }
            let wordCount = slots * wordsPerSlot(kind: kind, level: level)
            var words = [UInt64](repeating: 0, count: wordCount)
            for i in 0..<wordCount { words[i] = raw.loadLE(UInt64.self, at: headerByteCount + 8 * i) }
            let tail = headerByteCount + 8 * wordCount
            guard raw[tail..<checksumOffset].allSatisfy({ $0 == 0 }) else { throw fail(tail, "unused bytes are not zero") }
            return words
        } }.get()
    }
}

/// Byte layout of a segment header, the first sector of every segment written
/// (Specs/FORMAT.md §4).
public enum SegmentHeaderLayout {
    public static let magic: [UInt8] = Array("LPSEGMNT".utf8)
    public static let byteCount = 512
    public static let checksumOffset = 504
}

public struct SegmentHeader: Sendable, Equatable {
    public var poolUUID: [UInt8]
    public var segmentIndex: UInt32
    /// The superblock generation current when the segment was opened for writing.
    public var generation: UInt64

    public init(poolUUID: [UInt8], segmentIndex: UInt32, generation: UInt64) {
        self.poolUUID = poolUUID
        self.segmentIndex = segmentIndex
        self.generation = generation
    }

    public func encode() -> [UInt8] {
        var w = ByteWriter(capacity: SegmentHeaderLayout.byteCount)
        w.append(SegmentHeaderLayout.magic)
        w.append(poolUUID)
        w.u32(segmentIndex)
        w.u32(0)
        w.u64(generation)
        w.zeros(SegmentHeaderLayout.checksumOffset - w.byteCount)
        w.u64(Checksum.xxh3(w.bytes))
        return w.bytes
    }

    public static func decode(_ bytes: [UInt8], byteOffset: UInt64) throws(CorruptionError) -> SegmentHeader {
        var r = ByteReader(bytes, structure: "segment header", baseByteOffset: byteOffset)
        guard bytes.count == SegmentHeaderLayout.byteCount else { throw r.error("truncated: \(bytes.count) bytes") }
        guard try r.raw(8, "magic") == SegmentHeaderLayout.magic else { throw r.error("bad magic", at: 0) }
        let stored = bytes.withUnsafeBytes { $0.loadLE(UInt64.self, at: SegmentHeaderLayout.checksumOffset) }
        let computed = Checksum.xxh3(bytes[0..<SegmentHeaderLayout.checksumOffset])
        guard stored == computed else {
            throw r.error("checksum mismatch: stored \(hex(stored)), computed \(hex(computed))", at: SegmentHeaderLayout.checksumOffset)
        }
        let uuid = try r.raw(16, "pool UUID")
        let index = try r.u32("segment index")
        guard try r.u32("reserved") == 0 else { throw r.error("reserved bytes are not zero") }
        let generation = try r.u64("generation")
        if let nonzero = bytes[r.position..<SegmentHeaderLayout.checksumOffset].firstIndex(where: { $0 != 0 }) {
            throw r.error("reserved byte is not zero", at: nonzero)
        }
        return SegmentHeader(poolUUID: uuid, segmentIndex: index, generation: generation)
    }
}
