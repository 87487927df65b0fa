/// Compression applied to data blocks, a pool-wide setting stored in the superblock.
public enum CompressionMode: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    case none = 0
    case lz4 = 1

    public var description: String { self == .none ? "none" : "lz4" }
}

/// Byte layout of one superblock slot, format version 1. Specs/FORMAT.md §2 is normative;
/// `FormatSpecTests` compares the two.
public enum SuperblockLayout {
    public static let magic: [UInt8] = Array("LOGPOOL".utf8) + [0x1A]
    public static let magicOffset = 0  // 8 bytes
    public static let formatVersionOffset = 8  // UInt16
    public static let slotIndexOffset = 10  // UInt16
    public static let blockByteCountOffset = 12  // UInt32
    public static let poolUUIDOffset = 16  // 16 bytes
    public static let generationOffset = 32  // UInt64
    public static let capacityByteCountOffset = 40  // UInt64
    public static let segmentByteCountOffset = 48  // UInt32
    public static let segmentCountOffset = 52  // UInt32
    public static let journalByteOffsetOffset = 56  // UInt64
    public static let journalByteCountOffset = 64  // UInt64
    public static let dataAreaByteOffsetOffset = 72  // UInt64
    public static let reserveSegmentCountOffset = 80  // UInt32
    public static let compressionOffset = 84  // UInt32
    public static let checkpointByteOffsetOffset = 88  // UInt64
    public static let checkpointByteCountOffset = 96  // UInt64
    public static let checkpointChecksumOffset = 104  // UInt64
    public static let journalReplayByteOffsetOffset = 112  // UInt64
    public static let journalReplaySequenceOffset = 120  // UInt64
    public static let parentChecksumOffset = 128  // UInt64
    public static let flagsOffset = 136  // UInt32
    public static let reserved0Offset = 140  // UInt32, zero
    public static let createdTimeOffset = 144  // Int64, Unix seconds
    public static let reservedOffset = 152  // zero up to the checksum
    public static let checksumOffset = 504  // UInt64, XXH3-64 of [0, 504)
    public static let byteCount = 512
}

/// One decoded superblock slot: the commit point of the pool.
///
/// Invariants (Specs/FORMAT.md §2):
/// - SB-1 a slot is accepted only if magic, checksum, version, slot index, parity
///   (`generation % 2 == slotIndex`), reserved bytes and geometry all hold;
/// - SB-2 the checkpoint it names lies inside the data area and is read back with
///   `checkpointChecksum`;
/// - SB-3 journal records replayed from it carry `epoch == generation`.
public struct Superblock: Sendable, Equatable {
    public var slotIndex: Int
    public var poolUUID: [UInt8]
    public var generation: UInt64
    public var geometry: PoolGeometry
    public var compression: CompressionMode
    public var checkpointByteOffset: UInt64
    public var checkpointByteCount: UInt64
    public var checkpointChecksum: UInt64
    /// Offset inside the journal ring where replay starts.
    public var journalReplayByteOffset: UInt64
    /// The sequence number the first replayed record must carry.
    public var journalReplaySequence: UInt64
    /// The checksum field of the slot this one superseded (0 for the first).
    public var parentChecksum: UInt64
    public var flags: UInt32
    public var createdTime: Int64

    /// Flag bit 0: the pool was open for writing when this slot was written; a cleanly
    /// closed pool has it clear.
    public static let flagMounted: UInt32 = 1

    public init(
        slotIndex: Int, poolUUID: [UInt8], generation: UInt64, geometry: PoolGeometry,
        compression: CompressionMode, checkpointByteOffset: UInt64, checkpointByteCount: UInt64,
        checkpointChecksum: UInt64, journalReplayByteOffset: UInt64, journalReplaySequence: UInt64,
        parentChecksum: UInt64, flags: UInt32, createdTime: Int64
    ) {
        self.slotIndex = slotIndex
        self.poolUUID = poolUUID
        self.generation = generation
        self.geometry = geometry
        self.compression = compression
        self.checkpointByteOffset = checkpointByteOffset
        self.checkpointByteCount = checkpointByteCount
        self.checkpointChecksum = checkpointChecksum
        self.journalReplayByteOffset = journalReplayByteOffset
        self.journalReplaySequence = journalReplaySequence
        self.parentChecksum = parentChecksum
        self.flags = flags
        self.createdTime = createdTime
    }

    /// The salt that seeds journal, page and checkpoint checksums, so that records of
    /// another pool never verify here.
    public var poolSalt: UInt64 { Superblock.salt(of: poolUUID) }

    public static func salt(of uuid: [UInt8]) -> UInt64 {
        Checksum.xxh3(uuid, seed: 0x4C50_5341_4C54_0001)
    }

    public var isMounted: Bool { flags & Self.flagMounted != 0 }

    public static func structureName(slotIndex: Int) -> String {
        slotIndex == 0 ? "superblock slot A" : "superblock slot B"
    }

    /// Encodes to exactly 512 bytes, checksum included.
    public func encode() -> [UInt8] {
        precondition(slotIndex == Int(generation % 2), "generation \(generation) belongs in slot \(generation % 2)")
        precondition(poolUUID.count == 16, "pool UUID is 16 bytes")
        var w = ByteWriter(capacity: SuperblockLayout.byteCount)
        w.append(SuperblockLayout.magic)
        w.u16(PoolGeometry.formatVersion)
        w.u16(UInt16(slotIndex))
        w.u32(geometry.blockByteCount)
        w.append(poolUUID)
        w.u64(generation)
        w.u64(geometry.capacityByteCount)
        w.u32(geometry.segmentByteCount)
        w.u32(geometry.segmentCount)
        w.u64(PoolGeometry.journalByteOffset)
        w.u64(geometry.journalByteCount)
        w.u64(geometry.dataAreaByteOffset)
        w.u32(geometry.reserveSegmentCount)
        w.u32(compression.rawValue)
        w.u64(checkpointByteOffset)
        w.u64(checkpointByteCount)
        w.u64(checkpointChecksum)
        w.u64(journalReplayByteOffset)
        w.u64(journalReplaySequence)
        w.u64(parentChecksum)
        w.u32(flags)
        w.u32(0)
        w.i64(createdTime)
        w.zeros(SuperblockLayout.checksumOffset - w.byteCount)
        w.u64(Checksum.xxh3(w.bytes))
        assert(w.byteCount == SuperblockLayout.byteCount)
        return w.bytes
    }

    /// The checksum field of this slot's encoding.
    public var checksum: UInt64 {
        let bytes = encode()
        return bytes.withUnsafeBytes { $0.loadLE(UInt64.self, at: SuperblockLayout.checksumOffset) }
    }

    /// Decodes one slot read from `slotIndex`'s position. Never traps: every defect is a
    /// thrown ``CorruptionError`` naming the slot, the field's offset and what was found.
    public static func decode(_ bytes: [UInt8], slotIndex: Int) throws(CorruptionError) -> Superblock {
        precondition(slotIndex == 0 || slotIndex == 1, "there are two superblock slots")
        let name = structureName(slotIndex: slotIndex)
        let base = PoolGeometry.superblockSlotByteOffsets[slotIndex]
        func fail(_ offset: Int, _ detail: String) -> CorruptionError {
            CorruptionError(name, at: base + UInt64(offset), detail)
        }
        guard bytes.count == SuperblockLayout.byteCount else {
            throw fail(0, "truncated: expected \(SuperblockLayout.byteCount) bytes, found \(bytes.count)")
        }
        // Magic first, so a file that is not a pool says so rather than "bad checksum".
        guard Array(bytes[0..<8]) == SuperblockLayout.magic else {
            if bytes.allSatisfy({ $0 == 0 }) { throw fail(0, "bad magic: slot is all zeros") }
            throw fail(0, "bad magic: not a LogPool superblock")
        }
        let (stored, computed, version): (UInt64, UInt64, UInt16) = bytes.withUnsafeBytes { raw in
            (raw.loadLE(UInt64.self, at: SuperblockLayout.checksumOffset),
             Checksum.xxh3(UnsafeRawBufferPointer(rebasing: raw[0..<SuperblockLayout.checksumOffset])),
             raw.loadLE(UInt16.self, at: SuperblockLayout.formatVersionOffset))
        }
        guard stored == computed else {
            throw fail(SuperblockLayout.checksumOffset,
                "checksum mismatch: stored \(hex(stored)), computed \(hex(computed))")
        }
        // Another format is not damage, but this build cannot read it.
        guard version == PoolGeometry.formatVersion else {
            throw fail(SuperblockLayout.formatVersionOffset,
                "unsupported format version \(version) (this build reads version \(PoolGeometry.formatVersion))")
        }
        var r = ByteReader(bytes, structure: name, baseByteOffset: base, position: 10)
        let storedSlot = Int(try r.u16("slot index"))
        guard storedSlot == slotIndex else {
            // A slot written to the other slot's place: a misdirected write.
            throw fail(SuperblockLayout.slotIndexOffset, "slot index \(storedSlot) found in slot \(slotIndex)'s place")
        }
        let blockByteCount = try r.u32("block size")
        let uuid = try r.raw(16, "pool UUID")
        let generation = try r.u64("generation")
        guard generation < PoolGeometry.counterMax else {
            throw fail(SuperblockLayout.generationOffset, "generation \(generation) is beyond \(PoolGeometry.counterMax)")
        }
        guard generation % 2 == UInt64(slotIndex) else {
            throw fail(SuperblockLayout.generationOffset, "generation \(generation) has the wrong parity for slot \(slotIndex)")
        }
        let capacity = try r.u64("capacity")
        let segmentByteCount = try r.u32("segment size")
        let segmentCount = try r.u32("segment count")
        let journalOffset = try r.u64("journal offset")
        let journalByteCount = try r.u64("journal size")
        let dataArea = try r.u64("data area offset")
        let reserve = try r.u32("reserve segment count")
        let compressionRaw = try r.u32("compression")
        let checkpointOffset = try r.u64("checkpoint offset")
        let checkpointByteCount = try r.u64("checkpoint size")
        let checkpointChecksum = try r.u64("checkpoint checksum")
        let replayOffset = try r.u64("journal replay offset")
        let replaySequence = try r.u64("journal replay sequence")
        let parent = try r.u64("parent checksum")
        let flags = try r.u32("flags")
        let reserved0 = try r.u32("reserved")
        let created = try r.i64("created time")
        guard reserved0 == 0, bytes[SuperblockLayout.reservedOffset..<SuperblockLayout.checksumOffset].allSatisfy({ $0 == 0 }) else {
            throw fail(SuperblockLayout.reservedOffset, "reserved bytes are not zero")
        }
        guard flags & ~Superblock.flagMounted == 0 else {
            throw fail(SuperblockLayout.flagsOffset, "unknown flags \(hex(UInt64(flags)))")
        }
        guard let compression = CompressionMode(rawValue: compressionRaw) else {
            throw fail(SuperblockLayout.compressionOffset, "unknown compression \(compressionRaw)")
        }
        // Geometry: every figure must be one that `PoolGeometry.make` could have produced,
        // so that later arithmetic on it cannot overflow or point outside the file.
        guard PoolGeometry.blockByteCountRange.contains(blockByteCount), blockByteCount.nonzeroBitCount == 1 else {
            throw fail(SuperblockLayout.blockByteCountOffset, "block size \(blockByteCount) is not a power of two in 512...65536")
        }
        guard segmentByteCount.nonzeroBitCount == 1, segmentByteCount >= PoolGeometry.segmentByteCountMin,
            segmentByteCount <= PoolGeometry.segmentByteCountMax, segmentByteCount >= 16 * blockByteCount
        else {
            throw fail(SuperblockLayout.segmentByteCountOffset, "segment size \(segmentByteCount) is invalid")
        }
        guard journalOffset == PoolGeometry.journalByteOffset else {
            throw fail(SuperblockLayout.journalByteOffsetOffset, "journal offset \(journalOffset), expected \(PoolGeometry.journalByteOffset)")
        }
        guard reserve == PoolGeometry.reserveSegmentCountDefault else {
            throw fail(SuperblockLayout.reserveSegmentCountOffset, "reserve segment count \(reserve), expected \(PoolGeometry.reserveSegmentCountDefault)")
        }
        guard replaySequence < PoolGeometry.counterMax else {
            throw fail(SuperblockLayout.journalReplaySequenceOffset, "journal replay sequence \(replaySequence) is beyond \(PoolGeometry.counterMax)")
        }
        guard journalByteCount >= PoolGeometry.journalByteCountMin, journalByteCount <= 1 << 30, journalByteCount % 4096 == 0 else {
            throw fail(SuperblockLayout.journalByteCountOffset, "journal size \(journalByteCount) is invalid")
        }
        let expectedDataArea = (journalOffset + journalByteCount + 4095) & ~UInt64(4095)
        guard dataArea == expectedDataArea else {
            throw fail(SuperblockLayout.dataAreaByteOffsetOffset, "data area offset \(dataArea), expected \(expectedDataArea)")
        }
        let (segmentsBytes, o1) = UInt64(segmentCount).multipliedReportingOverflow(by: UInt64(segmentByteCount))
        let (end, o2) = dataArea.addingReportingOverflow(segmentsBytes)
        guard !o1, !o2, segmentCount >= reserve + 4, end <= capacity, capacity - end < UInt64(segmentByteCount) else {
            throw fail(SuperblockLayout.segmentCountOffset,
                "segment count \(segmentCount) of \(segmentByteCount) bytes does not fit capacity \(capacity)")
        }
        let geometry = PoolGeometry(
            capacityByteCount: capacity, blockByteCount: blockByteCount, segmentByteCount: segmentByteCount,
            segmentCount: segmentCount, journalByteCount: journalByteCount, dataAreaByteOffset: dataArea,
            reserveSegmentCount: reserve)
        guard geometry.isValidExtent(byteOffset: checkpointOffset, byteCount: checkpointByteCount) else {
            throw fail(SuperblockLayout.checkpointByteOffsetOffset,
                "checkpoint extent \(checkpointOffset)+\(checkpointByteCount) is outside every segment")
        }
        guard replayOffset < journalByteCount, replayOffset % UInt64(PoolGeometry.sectorByteCount) == 0 else {
            throw fail(SuperblockLayout.journalReplayByteOffsetOffset, "journal replay offset \(replayOffset) is invalid")
        }
        return Superblock(
            slotIndex: slotIndex, poolUUID: uuid, generation: generation, geometry: geometry,
            compression: compression, checkpointByteOffset: checkpointOffset,
            checkpointByteCount: checkpointByteCount, checkpointChecksum: checkpointChecksum,
            journalReplayByteOffset: replayOffset, journalReplaySequence: replaySequence,
            parentChecksum: parent, flags: flags, createdTime: created)
    }
}

/// The result of choosing between the two slots at open.
public struct SuperblockChoice: Sendable {
    public var chosen: Superblock
    /// Why the other slot was not chosen, when that is a problem worth reporting:
    /// damaged, or valid but not the chosen slot's direct parent.
    public var otherSlotProblem: String?
}

/// Chooses the slot to open from (Specs/COMMIT.md §3):
///
///     slot A      slot B      choose      report
///     valid g     valid g-1   A           -
///     valid g     valid g+1   B           -
///     valid g     valid g±k   newer       other is stale (k > 1: a lost commit)
///     valid       damaged     A           B damaged (torn commit or media damage)
///     damaged     valid       B           A damaged
///     damaged     damaged     throw       the error of both slots
public func chooseSuperblock(
    _ slotA: Result<Superblock, CorruptionError>, _ slotB: Result<Superblock, CorruptionError>
) throws(CorruptionError) -> SuperblockChoice {
    switch (slotA, slotB) {
    case (.success(let a), .success(let b)):
        if a.poolUUID != b.poolUUID {
            // Two valid slots of different pools: refuse to guess which one is ours.
            throw CorruptionError("superblock", at: 0, "slots A and B belong to different pools")
        }
        let (newer, older) = a.generation > b.generation ? (a, b) : (b, a)
        var problem: String? = nil
        if newer.generation != older.generation + 1 {
            problem = "\(Superblock.structureName(slotIndex: older.slotIndex)) is stale: generation \(older.generation), chosen \(newer.generation)"
        } else if newer.parentChecksum != older.checksum {
            problem = "\(Superblock.structureName(slotIndex: older.slotIndex)) is not the parent of generation \(newer.generation)"
        }
        return SuperblockChoice(chosen: newer, otherSlotProblem: problem)
    case (.success(let a), .failure(let e)):
        return SuperblockChoice(chosen: a, otherSlotProblem: e.description)
    case (.failure(let e), .success(let b)):
        return SuperblockChoice(chosen: b, otherSlotProblem: e.description)
    case (.failure(let ea), .failure(let eb)):
        if ea.detail.hasPrefix("bad magic"), eb.detail.hasPrefix("bad magic") {
            throw CorruptionError("superblock", at: 0, "not a LogPool pool (bad magic in both slots; if it was one, both superblock slots are destroyed)")
        }
        throw CorruptionError("superblock", at: ea.byteOffset, "no valid slot: slot A: \(ea.detail); slot B: \(eb.detail)")
    }
}

public func hex(_ value: UInt64) -> String {
    "0x" + String(value, radix: 16)
}

extension Superblock {
    /// The format version a slot's bytes carry when its magic and checksum are valid
    /// (whatever the version), or nil: tells a pool of another format from damage.
    public static func formatVersion(ofSlot bytes: [UInt8]) -> UInt16? {
        guard bytes.count == SuperblockLayout.byteCount, Array(bytes[0..<8]) == SuperblockLayout.magic else { return nil }
        return bytes.withUnsafeBytes { raw -> UInt16? in
            let stored = raw.loadLE(UInt64.self, at: SuperblockLayout.checksumOffset)
            let computed = Checksum.xxh3(UnsafeRawBufferPointer(rebasing: raw[0..<SuperblockLayout.checksumOffset]))
            return stored == computed ? raw.loadLE(UInt16.self, at: SuperblockLayout.formatVersionOffset) : nil
        }
    }
}
