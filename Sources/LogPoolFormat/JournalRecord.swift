/// Byte layout of a journal record header, format version 1 (Specs/FORMAT.md §3).
public enum JournalRecordLayout {
    public static let magic: UInt32 = 0x314A_504C  // "LPJ1"
    public static let magicOffset = 0  // UInt32
    public static let kindOffset = 4  // UInt16
    public static let flagsOffset = 6  // UInt16, zero
    public static let payloadByteCountOffset = 8  // UInt32
    public static let reservedOffset = 12  // UInt32, zero
    public static let sequenceOffset = 16  // UInt64
    public static let epochOffset = 24  // UInt64
    public static let durableSequenceOffset = 32  // UInt64
    public static let checksumOffset = 40  // UInt64, XXH3-64(seed: pool salt) of [0,40) ++ payload
    public static let headerByteCount = 48
    /// A record payload never exceeds this; it bounds what replay allocates.
    public static let payloadByteCountMax = 4 * 1024 * 1024
}

/// One block mapped by a ``JournalIntent/map`` record: logical block `blockIndex` of the
/// volume now names block `blockID`, whose bytes are at `location`.
public struct BlockMapping: Sendable, Equatable {
    public var blockIndex: UInt64
    public var blockID: UInt64
    public var location: BlockLocation

    public init(blockIndex: UInt64, blockID: UInt64, location: BlockLocation) {
        self.blockIndex = blockIndex
        self.blockID = blockID
        self.location = location
    }
}

/// Where a block's bytes live and how to check them: the block-table entry.
public struct BlockLocation: Sendable, Equatable, Hashable {
    /// Byte offset in the pool file, sector aligned, inside a segment payload. 0 = free.
    public var byteOffset: UInt64
    /// Bytes stored (compressed length when compressed); occupies whole sectors on disk.
    public var storedByteCount: UInt32
    /// Bit 0: LZ4 compressed.
    public var flags: UInt32
    /// XXH3-64 (seed 0) of the stored bytes.
    public var checksum: UInt64

    public static let flagCompressed: UInt32 = 1
    public static let free = BlockLocation(byteOffset: 0, storedByteCount: 0, flags: 0, checksum: 0)

    public init(byteOffset: UInt64, storedByteCount: UInt32, flags: UInt32, checksum: UInt64) {
        self.byteOffset = byteOffset
        self.storedByteCount = storedByteCount
        self.flags = flags
        self.checksum = checksum
    }

    public var isFree: Bool { byteOffset == 0 }
    public var isCompressed: Bool { flags & Self.flagCompressed != 0 }
    /// Bytes the block occupies in its segment (whole sectors).
    public var allocatedByteCount: UInt64 { sectorAligned(UInt64(storedByteCount)) }
}

/// A block moved by the compactor.
public struct BlockRelocation: Sendable, Equatable {
    public var blockID: UInt64
    public var location: BlockLocation

    public init(blockID: UInt64, location: BlockLocation) {
        self.blockID = blockID
        self.location = location
    }
}

public enum VolumeKind: UInt8, Sendable, Equatable, CustomStringConvertible {
    case volume = 1
    case snapshot = 2

    public var description: String { self == .volume ? "volume" : "snapshot" }
}

/// Every metadata change, as it is journaled (Specs/FORMAT.md §3.2).
public enum JournalIntent: Sendable, Equatable {
    /// Fills the rest of a sector after a sync (never replayed as a change).
    case padding(byteCount: Int)
    /// The writer continued at the start of the ring.
    case wrap
    case createVolume(id: UInt64, name: String, sizeByteCount: UInt64, createdTime: Int64)
    /// Snapshot (kind .snapshot) or clone (kind .volume) of `sourceID`.
    case branch(id: UInt64, sourceID: UInt64, kind: VolumeKind, name: String, createdTime: Int64)
    case delete(id: UInt64)
    /// Releases slots `[released, upTo)` of queued map `id` (a deleted volume's, C-11)
    /// as an unmap of that range would, and the whole queued map once `upTo` reaches its
    /// capacity.
    case releaseQueued(id: UInt64, upTo: UInt64)
    case rename(id: UInt64, name: String)
    case resize(id: UInt64, sizeByteCount: UInt64)
    /// Unmaps the ranges then maps the blocks: one write, discard or both, applied whole.
    case map(volumeID: UInt64, unmapRanges: [Range<UInt64>], mappings: [BlockMapping])
    case relocate([BlockRelocation])
    /// A run of whole, uncompressed blocks written together: logical blocks
    /// `firstBlockIndex...`, ids `firstBlockID...` and locations `firstByteOffset...`
    /// all consecutive (stride `storedByteCount`), one checksum each. The compact form of
    /// `map` for sequential writes (8 bytes per block instead of 40).
    case mapRun(volumeID: UInt64, firstBlockIndex: UInt64, firstBlockID: UInt64, firstByteOffset: UInt64,
                storedByteCount: UInt32, checksums: [UInt64])

    /// The mappings a `mapRun` stands for.
    public static func runMappings(firstBlockIndex: UInt64, firstBlockID: UInt64, firstByteOffset: UInt64,
                                   storedByteCount: UInt32, checksums: [UInt64]) -> [BlockMapping] {
        checksums.enumerated().map { i, sum in
            BlockMapping(blockIndex: firstBlockIndex &+ UInt64(i), blockID: firstBlockID &+ UInt64(i),
                         location: BlockLocation(byteOffset: firstByteOffset &+ UInt64(i) &* UInt64(storedByteCount),
                                                 storedByteCount: storedByteCount, flags: 0, checksum: sum))
        }
    }

    public var kindCode: UInt16 {
        switch self {
        case .padding: 1
        case .wrap: 2
        case .createVolume: 10
        case .branch: 11
        case .delete: 12
        case .releaseQueued: 15
        case .rename: 13
        case .resize: 14
        case .map: 20
        case .relocate: 21
        case .mapRun: 22
        }
    }

    /// Encoded payload length without encoding it (used to plan ring space).
    public var payloadByteCount: Int {
        switch self {
        case .padding(let n): n
        case .wrap: 0
        case .createVolume(_, let name, _, _): 8 + 8 + 8 + 2 + name.utf8.count
        case .branch(_, _, _, let name, _): 8 + 8 + 1 + 8 + 2 + name.utf8.count
        case .delete: 8
        case .releaseQueued: 16
        case .rename(_, let name): 8 + 2 + name.utf8.count
        case .resize: 16
        case .map(_, let ranges, let mappings): 16 + ranges.count * 16 + mappings.count * 40
        case .relocate(let moves): 4 + moves.count * 32
        case .mapRun(_, _, _, _, _, let checksums): 40 + checksums.count * 8
        }
    }

    func encodePayload(into w: inout ByteWriter) {
        switch self {
        case .padding(let n):
            w.zeros(n)
        case .wrap:
            break
        case .createVolume(let id, let name, let size, let time):
            w.u64(id); w.u64(size); w.i64(time); w.string(name)
        case .branch(let id, let source, let kind, let name, let time):
            w.u64(id); w.u64(source); w.u8(kind.rawValue); w.i64(time); w.string(name)
        case .delete(let id):
            w.u64(id)
        case .releaseQueued(let id, let upTo):
            w.u64(id); w.u64(upTo)
        case .rename(let id, let name):
            w.u64(id); w.string(name)
        case .resize(let id, let size):
            w.u64(id); w.u64(size)
        case .map(let volume, let ranges, let mappings):
            w.u64(volume); w.u32(UInt32(ranges.count)); w.u32(UInt32(mappings.count))
            for range in ranges { w.u64(range.lowerBound); w.u64(range.upperBound) }
            for m in mappings {
                w.u64(m.blockIndex); w.u64(m.blockID)
                encode(m.location, into: &w)
            }
        case .relocate(let moves):
            w.u32(UInt32(moves.count))
            for move in moves { w.u64(move.blockID); encode(move.location, into: &w) }
        case .mapRun(let volume, let index, let id, let offset, let stored, let checksums):
            w.u64(volume); w.u64(index); w.u64(id); w.u64(offset); w.u32(stored); w.u32(UInt32(checksums.count))
            for sum in checksums { w.u64(sum) }
        }
    }

    private func encode(_ location: BlockLocation, into w: inout ByteWriter) {
        w.u64(location.byteOffset); w.u32(location.storedByteCount); w.u32(location.flags); w.u64(location.checksum)
    }

    static func decodePayload(kind: UInt16, _ r: inout ByteReader) throws(CorruptionError) -> JournalIntent {
        func location(_ r: inout ByteReader) throws(CorruptionError) -> BlockLocation {
            BlockLocation(byteOffset: try r.u64("block offset"), storedByteCount: try r.u32("stored size"),
                          flags: try r.u32("block flags"), checksum: try r.u64("block checksum"))
        }
        switch kind {
        case 1:
            let n = r.remainingByteCount
            try r.skip(n)
            return .padding(byteCount: n)
        case 2:
            return .wrap
        case 10:
            let id = try r.u64("volume id"), size = try r.u64("size"), time = try r.i64("created time")
            return .createVolume(id: id, name: try r.string("name"), sizeByteCount: size, createdTime: time)
        case 11:
            let id = try r.u64("volume id"), source = try r.u64("source id")
            let kindStart = r.position
            guard let kind = VolumeKind(rawValue: try r.u8("kind")) else {
                throw r.error("unknown volume kind", at: kindStart)
            }
            let time = try r.i64("created time")
            return .branch(id: id, sourceID: source, kind: kind, name: try r.string("name"), createdTime: time)
        case 12:
            return .delete(id: try r.u64("volume id"))
        case 15:
            return .releaseQueued(id: try r.u64("queued map id"), upTo: try r.u64("released slot bound"))
        case 13:
            let id = try r.u64("volume id")
            return .rename(id: id, name: try r.string("name"))
        case 14:
            return .resize(id: try r.u64("volume id"), sizeByteCount: try r.u64("size"))
        case 20:
            let volume = try r.u64("volume id")
            let rangeCount = Int(try r.u32("range count")), mappingCount = Int(try r.u32("mapping count"))
            // Validate the counts against the bytes present before allocating anything.
            try r.require(rangeCount * 16 + mappingCount * 40, for: "map entries")
            var ranges: [Range<UInt64>] = []
            ranges.reserveCapacity(rangeCount)
            for _ in 0..<rangeCount {
                let start = r.position
                let lower = try r.u64("range start"), upper = try r.u64("range end")
                guard lower <= upper else { throw r.error("unmap range \(lower)..<\(upper) is reversed", at: start) }
                ranges.append(lower..<upper)
            }
            var mappings: [BlockMapping] = []
            mappings.reserveCapacity(mappingCount)
            for _ in 0..<mappingCount {
                let index = try r.u64("block index"), id = try r.u64("block id")
                mappings.append(BlockMapping(blockIndex: index, blockID: id, location: try location(&r)))
            }
            return .map(volumeID: volume, unmapRanges: ranges, mappings: mappings)
        case 21:
            let count = Int(try r.u32("move count"))
            try r.require(count * 32, for: "moves")
            var moves: [BlockRelocation] = []
            moves.reserveCapacity(count)
            for _ in 0..<count {
                let id = try r.u64("block id")
                moves.append(BlockRelocation(blockID: id, location: try location(&r)))
            }
            return .relocate(moves)
        case 22:
            let volume = try r.u64("volume id"), index = try r.u64("first block index")
            let id = try r.u64("first block id"), offset = try r.u64("first byte offset")
            let stored = try r.u32("stored size")
            let count = Int(try r.u32("block count"))
            try r.require(count * 8, for: "checksums")
            var checksums: [UInt64] = []
            checksums.reserveCapacity(count)
            for _ in 0..<count { checksums.append(try r.u64("checksum")) }
            return .mapRun(volumeID: volume, firstBlockIndex: index, firstBlockID: id, firstByteOffset: offset,
                           storedByteCount: stored, checksums: checksums)
        default:
            throw r.error("unknown record kind \(kind)", at: 0)
        }
    }
}

/// A journal record: header plus intent (Specs/FORMAT.md §3).
public struct JournalRecord: Sendable, Equatable {
    public var sequence: UInt64
    /// The superblock generation this journal stretch replays from (SB-3).
    public var epoch: UInt64
    /// Every record with a smaller sequence was durable when this one was written, so
    /// replay need not re-check their data.
    public var durableSequence: UInt64
    public var intent: JournalIntent

    public init(sequence: UInt64, epoch: UInt64, durableSequence: UInt64, intent: JournalIntent) {
        self.sequence = sequence
        self.epoch = epoch
        self.durableSequence = durableSequence
        self.intent = intent
    }

    public var encodedByteCount: Int { JournalRecordLayout.headerByteCount + intent.payloadByteCount }

    public func encode(salt: UInt64) -> [UInt8] {
        var w = ByteWriter(capacity: encodedByteCount)
        encode(salt: salt, into: &w)
        return w.bytes
    }

    /// Appends the encoding to `w`.
    public func encode(salt: UInt64, into w: inout ByteWriter) {
        let start = w.byteCount
        let payload = intent.payloadByteCount
        precondition(payload <= JournalRecordLayout.payloadByteCountMax, "journal payload of \(payload) bytes is too large")
        w.u32(JournalRecordLayout.magic)
        w.u16(intent.kindCode)
        w.u16(0)
        w.u32(UInt32(payload))
        w.u32(0)
        w.u64(sequence)
        w.u64(epoch)
        w.u64(durableSequence)
        w.u64(0)  // checksum, patched below
        intent.encodePayload(into: &w)
        assert(w.byteCount - start == encodedByteCount, "payloadByteCount disagrees with the encoding")
        let sum = w.bytes.withUnsafeBytes { raw -> UInt64 in
            var state = XXH3Streaming(seed: salt)
            state.update(UnsafeRawBufferPointer(rebasing: raw[start..<start + JournalRecordLayout.checksumOffset]))
            state.update(UnsafeRawBufferPointer(rebasing: raw[(start + JournalRecordLayout.headerByteCount)...]))
            return state.digest()
        }
        w.patch(u64: sum, at: start + JournalRecordLayout.checksumOffset)
    }

    /// What a header says before the payload is read.
    public struct Header: Sendable, Equatable {
        public var kind: UInt16
        public var payloadByteCount: Int
        public var sequence: UInt64
        public var epoch: UInt64
        public var durableSequence: UInt64
        public var checksum: UInt64
    }

    /// Decodes a header. Throws when the magic, reserved fields or length are wrong.
    public static func decodeHeader(_ bytes: UnsafeRawBufferPointer, byteOffset: UInt64) throws(CorruptionError) -> Header {
        func fail(_ detail: String) -> CorruptionError { CorruptionError("journal record", at: byteOffset, detail) }
        guard bytes.count >= JournalRecordLayout.headerByteCount else { throw fail("truncated header") }
        let magic = bytes.loadLE(UInt32.self, at: JournalRecordLayout.magicOffset)
        guard magic == JournalRecordLayout.magic else { throw fail("bad magic \(hex(UInt64(magic)))") }
        guard bytes.loadLE(UInt16.self, at: JournalRecordLayout.flagsOffset) == 0,
            bytes.loadLE(UInt32.self, at: JournalRecordLayout.reservedOffset) == 0
        else { throw fail("reserved header fields are not zero") }
        let payload = Int(bytes.loadLE(UInt32.self, at: JournalRecordLayout.payloadByteCountOffset))
        guard payload <= JournalRecordLayout.payloadByteCountMax else { throw fail("payload length \(payload) is too large") }
        return Header(
            kind: bytes.loadLE(UInt16.self, at: JournalRecordLayout.kindOffset), payloadByteCount: payload,
            sequence: bytes.loadLE(UInt64.self, at: JournalRecordLayout.sequenceOffset),
            epoch: bytes.loadLE(UInt64.self, at: JournalRecordLayout.epochOffset),
            durableSequence: bytes.loadLE(UInt64.self, at: JournalRecordLayout.durableSequenceOffset),
            checksum: bytes.loadLE(UInt64.self, at: JournalRecordLayout.checksumOffset))
    }

    /// Decodes a whole record (header + payload in `bytes`), checking the checksum first.
    public static func decode(_ bytes: [UInt8], salt: UInt64, byteOffset: UInt64) throws(CorruptionError) -> JournalRecord {
        let header = try bytes.withUnsafeBytes { raw in
            Result { () throws(CorruptionError) in try decodeHeader(raw, byteOffset: byteOffset) }
        }.get()
        guard bytes.count == JournalRecordLayout.headerByteCount + header.payloadByteCount else {
            throw CorruptionError("journal record", at: byteOffset, "record is \(bytes.count) bytes, header says \(JournalRecordLayout.headerByteCount + header.payloadByteCount)")
        }
        let computed = bytes.withUnsafeBytes { raw -> UInt64 in
            var state = XXH3Streaming(seed: salt)
            state.update(UnsafeRawBufferPointer(rebasing: raw[0..<JournalRecordLayout.checksumOffset]))
            state.update(UnsafeRawBufferPointer(rebasing: raw[JournalRecordLayout.headerByteCount...]))
            return state.digest()
        }
        guard computed == header.checksum else {
            throw CorruptionError("journal record", at: byteOffset,
                "checksum mismatch: stored \(hex(header.checksum)), computed \(hex(computed))")
        }
        var r = ByteReader(bytes, structure: "journal record", baseByteOffset: byteOffset,
                           position: JournalRecordLayout.headerByteCount)
        let intent = try JournalIntent.decodePayload(kind: header.kind, &r)
        guard r.remainingByteCount == 0 else {
            throw r.error("\(r.remainingByteCount) unexpected bytes after the payload")
        }
        return JournalRecord(sequence: header.sequence, epoch: header.epoch,
                             durableSequence: header.durableSequence, intent: intent)
    }
}
