import Foundation
import LogPoolFormat
import Testing

func sampleSuperblock(generation: UInt64 = 7) -> Superblock {
    let geometry = try! PoolGeometry.make(capacityByteCount: 64 << 20, blockByteCount: 4096, segmentByteCount: nil).get()
    return Superblock(
        slotIndex: Int(generation % 2), poolUUID: Array(0..<16), generation: generation, geometry: geometry,
        compression: .lz4, checkpointByteOffset: geometry.dataAreaByteOffset + UInt64(PoolGeometry.segmentHeaderByteCount), checkpointByteCount: 1024,
        checkpointChecksum: 0x1234, journalReplayByteOffset: 4096, journalReplaySequence: 99,
        parentChecksum: 0xABCD, flags: Superblock.flagMounted, createdTime: 1_700_000_000)
}

/// The rows of a Markdown field table in Specs/FORMAT.md under `heading`: (offset, bytes, name).
func specRows(after heading: String) throws -> [(offset: Int, bytes: Int, name: String)] {
    let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("Specs/FORMAT.md")
    let text = try String(contentsOf: url, encoding: .utf8)
    guard let start = text.range(of: heading) else { throw CocoaError(.fileReadCorruptFile) }
    var rows: [(Int, Int, String)] = []
    var inTable = false
    for line in text[start.upperBound...].split(separator: "\n", omittingEmptySubsequences: false) {
        let trimmed = line.trimmingCharacters(in: .whitespaces)
        if trimmed.hasPrefix("| offset") { inTable = true; continue }
        if inTable && trimmed.hasPrefix("| ---") { continue }
        if inTable && !trimmed.hasPrefix("|") { break }
        if inTable {
            let cells = trimmed.split(separator: "|").map { $0.trimmingCharacters(in: .whitespaces) }
            if let offset = Int(cells[0]), let bytes = Int(cells[1]) { rows.append((offset, bytes, cells[3])) }
        }
    }
    return rows
}

@Suite("Format: specs match code")
struct FormatSpecTests {
    @Test("superblock field table matches SuperblockLayout and adds up to 512 bytes")
    func superblockTable() throws {
        let rows = try specRows(after: "## 2 Superblock slot")
        var expected = 0
        for row in rows {
            #expect(row.offset == expected, "row \(row.name) starts at \(row.offset), previous ended at \(expected)")
            expected = row.offset + row.bytes
        }
        #expect(expected == SuperblockLayout.byteCount)
        let byName = Dictionary(rows.map { ($0.name, $0.offset) }, uniquingKeysWith: { first, _ in first })
        #expect(byName["formatVersion"] == SuperblockLayout.formatVersionOffset)
        #expect(byName["slotIndex"] == SuperblockLayout.slotIndexOffset)
        #expect(byName["generation"] == SuperblockLayout.generationOffset)
        #expect(byName["checkpointByteOffset"] == SuperblockLayout.checkpointByteOffsetOffset)
        #expect(byName["journalReplaySequence"] == SuperblockLayout.journalReplaySequenceOffset)
        #expect(byName["parentChecksum"] == SuperblockLayout.parentChecksumOffset)
        #expect(byName["flags"] == SuperblockLayout.flagsOffset)
        #expect(byName["createdTime"] == SuperblockLayout.createdTimeOffset)
        #expect(byName["checksum"] == SuperblockLayout.checksumOffset)
        // The encoder puts fields where the table says.
        let bytes = sampleSuperblock().encode()
        bytes.withUnsafeBytes { raw in
            #expect(raw.loadLE(UInt64.self, at: SuperblockLayout.generationOffset) == 7)
            #expect(raw.loadLE(UInt64.self, at: SuperblockLayout.journalReplaySequenceOffset) == 99)
            #expect(raw.loadLE(UInt64.self, at: SuperblockLayout.parentChecksumOffset) == 0xABCD)
        }
    }

    @Test("journal header and segment header tables add up and match the layouts")
    func otherTables() throws {
        let journal = try specRows(after: "### 3.1 Record header")
        #expect(journal.last.map { $0.offset + $0.bytes } == JournalRecordLayout.headerByteCount)
        #expect(journal.first { $0.name == "checksum" }?.offset == JournalRecordLayout.checksumOffset)
        #expect(journal.first { $0.name == "durableSequence" }?.offset == JournalRecordLayout.durableSequenceOffset)
        let segment = try specRows(after: "## 4 Segments")
        #expect(segment.last.map { $0.offset + $0.bytes } == SegmentHeaderLayout.byteCount)
        let page = try specRows(after: "## 5 Metadata pages")
        #expect(page.last.map { $0.offset + $0.bytes } == PoolGeometry.pageByteCount)
        #expect(PageLayout.interiorFanout == 254 && PageLayout.mapLeafFanout == 509 && PageLayout.blockTableLeafFanout == 169)
        let root = try specRows(after: "## 6 Checkpoint root")
        // The fixed header ends where the volume rows start.
        #expect(root.last.map { $0.offset + $0.bytes } == CheckpointRoot.headerByteCount)
    }
}

@Suite("Format: superblock")
struct SuperblockTests {
    @Test("round trip")
    func roundTrip() throws {
        let sb = sampleSuperblock()
        #expect(try Superblock.decode(sb.encode(), slotIndex: 1) == sb)
    }

    /// Goal: SB-1. Method: flip every bit of an encoded slot; each must be rejected.
    @Test("every single-bit flip is detected")
    func everyBitFlip() {
        let bytes = sampleSuperblock().encode()
        for bit in 0..<(bytes.count * 8) {
            var damaged = bytes
            damaged[bit / 8] ^= 1 << UInt8(bit % 8)
            #expect(throws: CorruptionError.self, "bit \(bit)") { try Superblock.decode(damaged, slotIndex: 1) }
        }
    }

    @Test("misplaced slot, wrong parity and future version are named")
    func namedErrors() throws {
        let sb = sampleSuperblock(generation: 7)
        do {
            _ = try Superblock.decode(sb.encode(), slotIndex: 0)
            Issue.record("decoded a slot-B superblock from slot A's place")
        } catch {
            #expect(error.structure == "superblock slot A")
            #expect(error.detail.contains("slot index 1"))
        }
        var future = sb.encode()
        future[8] = UInt8(PoolGeometry.formatVersion + 1)
        let sum = Checksum.xxh3(Array(future[0..<504]))
        withUnsafeBytes(of: sum.littleEndian) { for i in 0..<8 { future[504 + i] = $0[i] } }
        do {
            _ = try Superblock.decode(future, slotIndex: 1)
            Issue.record("accepted format version \(PoolGeometry.formatVersion + 1)")
        } catch {
            #expect(error.detail.contains("unsupported format version \(PoolGeometry.formatVersion + 1)"))
        }
        #expect(throws: CorruptionError.self) { try Superblock.decode([UInt8](repeating: 0, count: 512), slotIndex: 0) }
        #expect(throws: CorruptionError.self) { try Superblock.decode([1, 2, 3], slotIndex: 0) }
    }

    @Test("slot choice follows the decision table")
    func choice() throws {
        let a = sampleSuperblock(generation: 8), b = sampleSuperblock(generation: 7)
        var chained = a
        chained.parentChecksum = b.checksum
        let damaged = CorruptionError("superblock slot B", at: 4096, "checksum mismatch")
        #expect(try chooseSuperblock(.success(chained), .success(b)).chosen.generation == 8)
        #expect(try chooseSuperblock(.success(chained), .success(b)).otherSlotProblem == nil)
        #expect(try chooseSuperblock(.success(a), .success(b)).otherSlotProblem != nil)  // parent mismatch
        let newerB = sampleSuperblock(generation: 9)
        #expect(try chooseSuperblock(.success(a), .success(newerB)).chosen.slotIndex == 1)
        let stale = try chooseSuperblock(.success(sampleSuperblock(generation: 12)), .success(b))
        #expect(stale.chosen.generation == 12 && stale.otherSlotProblem?.contains("stale") == true)
        #expect(try chooseSuperblock(.success(a), .failure(damaged)).otherSlotProblem?.contains("checksum") == true)
        #expect(throws: CorruptionError.self) {
            try chooseSuperblock(.failure(damaged), .failure(damaged))
        }
    }
}

@Suite("Format: journal, pages, checkpoint root")
struct RecordTests {
    static let intents: [JournalIntent] = [
        .padding(byteCount: 100), .wrap,
        .createVolume(id: 3, name: "disk é", sizeByteCount: 1 << 30, createdTime: 5),
        .branch(id: 4, sourceID: 3, kind: .snapshot, name: "s", createdTime: 6),
        .delete(id: 4), .rename(id: 3, name: "other"), .resize(id: 3, sizeByteCount: 8192),
        .map(volumeID: 3, unmapRanges: [1..<5, 9..<9], mappings: [
            BlockMapping(blockIndex: 7, blockID: 11, location: BlockLocation(byteOffset: 1 << 20, storedByteCount: 4096, flags: 0, checksum: 77)),
        ]),
        .relocate([BlockRelocation(blockID: 11, location: BlockLocation(byteOffset: 2 << 20, storedByteCount: 900, flags: 1, checksum: 78))]),
        .mapRun(volumeID: 3, firstBlockIndex: 10, firstBlockID: 20, firstByteOffset: 4 << 20, storedByteCount: 4096, checksums: [1, 2, 3]),
        .releaseQueued(id: 4, upTo: 509 * 16),
    ]

    @Test("every intent round-trips and a flipped bit is rejected", arguments: RecordTests.intents)
    func journalRoundTrip(intent: JournalIntent) throws {
        let record = JournalRecord(sequence: 42, epoch: 9, durableSequence: 40, intent: intent)
        let bytes = record.encode(salt: 5)
        #expect(bytes.count == record.encodedByteCount)
        #expect(try JournalRecord.decode(bytes, salt: 5, byteOffset: 0) == record)
        #expect(throws: CorruptionError.self) { try JournalRecord.decode(bytes, salt: 6, byteOffset: 0) }
        for bit in stride(from: 0, to: bytes.count * 8, by: 7) {
            var damaged = bytes
            damaged[bit / 8] ^= 1 << UInt8(bit % 8)
            #expect(throws: CorruptionError.self) { try JournalRecord.decode(damaged, salt: 5, byteOffset: 0) }
        }
    }

    @Test("a page is checked against its parent's checksum, kind and level")
    func pages() throws {
        var words = [UInt64](repeating: 0, count: PageLayout.mapLeafFanout)
        words[3] = 99
        let page = PageLayout.encode(kind: .map, level: 0, words: words, salt: 1)
        #expect(try PageLayout.decode(page.bytes, kind: .map, level: 0, expectedChecksum: page.checksum, salt: 1, byteOffset: 0) == words)
        #expect(throws: CorruptionError.self) { try PageLayout.decode(page.bytes, kind: .map, level: 0, expectedChecksum: page.checksum &+ 1, salt: 1, byteOffset: 0) }
        #expect(throws: CorruptionError.self) { try PageLayout.decode(page.bytes, kind: .blockTable, level: 0, expectedChecksum: page.checksum, salt: 1, byteOffset: 0) }
        #expect(throws: CorruptionError.self) { try PageLayout.decode(page.bytes, kind: .map, level: 1, expectedChecksum: page.checksum, salt: 1, byteOffset: 0) }
        #expect(throws: CorruptionError.self) { try PageLayout.decode(Array(page.bytes.prefix(100)), kind: .map, level: 0, expectedChecksum: page.checksum, salt: 1, byteOffset: 0) }
    }

    @Test("checkpoint root round-trips and rejects damage")
    func checkpointRoot() throws {
        let geometry = try PoolGeometry.make(capacityByteCount: 64 << 20, blockByteCount: 4096, segmentByteCount: nil).get()
        let root = CheckpointRoot(
            generation: 3, nextVolumeID: 3, blockTableRoot: .none, blockTableHeight: 1, blockIDLimit: 1,
            volumes: [VolumeRecord(id: 1, kind: .volume, name: "v", sizeByteCount: 8192, createdTime: 1, originID: 0, mapRoot: .none, mapHeight: 1),
                      VolumeRecord(id: 2, kind: .snapshot, name: "s", sizeByteCount: 8192, createdTime: 2, originID: 1, mapRoot: .none, mapHeight: 1)],
            segmentLiveByteCounts: [UInt64](repeating: 0, count: Int(geometry.segmentCount)))
        let encoded = root.encode(salt: 9)
        #expect(encoded.bytes.count == root.encodedByteCount)
        #expect(try CheckpointRoot.decode(encoded.bytes, expectedChecksum: encoded.checksum, salt: 9, byteOffset: 0, geometry: geometry) == root)
        var damaged = encoded.bytes
        damaged[80] ^= 0x10
        #expect(throws: CorruptionError.self) { try CheckpointRoot.decode(damaged, expectedChecksum: encoded.checksum, salt: 9, byteOffset: 0, geometry: geometry) }

        // Found by the checkpoint-root fuzzer (strict mode): nonzero padding and a root
        // longer than its encoding passed when their checksum was valid.
        func resealed(_ bytes: [UInt8]) -> ([UInt8], UInt64) {
            var body = Array(bytes.dropLast(8))
            let sum = Checksum.xxh3(body, seed: 9)
            withUnsafeBytes(of: sum.littleEndian) { body += $0 }
            return (body, sum)
        }
        var padded = encoded.bytes
        padded[padded.count - 9] = 1
        let (nonzeroPadding, sum1) = resealed(padded)
        #expect(throws: CorruptionError.self) { try CheckpointRoot.decode(nonzeroPadding, expectedChecksum: sum1, salt: 9, byteOffset: 0, geometry: geometry) }
        var longer = Array(encoded.bytes.dropLast(8)) + [UInt8](repeating: 0, count: 512) + [UInt8](repeating: 0, count: 8)
        let longerCount = UInt64(longer.count)
        longer.withUnsafeMutableBytes { $0.storeBytes(of: longerCount.littleEndian, toByteOffset: 8, as: UInt64.self) }
        let (tooLong, sum2) = resealed(longer)
        #expect(throws: CorruptionError.self) { try CheckpointRoot.decode(tooLong, expectedChecksum: sum2, salt: 9, byteOffset: 0, geometry: geometry) }
    }

    /// Found reading the checker for overflow: a map of height 8 (accepted before, since
    /// its capacity covers any size) made tree walks compute slot indexes past 2^64.
    @Test("a volume row whose map is taller than the largest volume needs is rejected")
    func mapHeightBound() throws {
        let geometry = try PoolGeometry.make(capacityByteCount: 64 << 20, blockByteCount: 512, segmentByteCount: nil).get()
        func root(height: Int) -> CheckpointRoot {
            CheckpointRoot(generation: 3, nextVolumeID: 2, blockTableRoot: .none, blockTableHeight: 1, blockIDLimit: 1,
                           volumes: [VolumeRecord(id: 1, kind: .volume, name: "v", sizeByteCount: 8192, createdTime: 1, originID: 0,
                                                  mapRoot: .none, mapHeight: height)],
                           segmentLiveByteCounts: [UInt64](repeating: 0, count: Int(geometry.segmentCount)))
        }
        let highest = CheckpointRoot.mapHeightMax(geometry)
        #expect(highest == 6)
        let ok = root(height: highest).encode(salt: 9)
        #expect(throws: Never.self) { try CheckpointRoot.decode(ok.bytes, expectedChecksum: ok.checksum, salt: 9, byteOffset: 0, geometry: geometry) }
        for height in [highest + 1, PageLayout.heightMax] {
            let tall = root(height: height).encode(salt: 9)
            #expect(throws: CorruptionError.self) { try CheckpointRoot.decode(tall.bytes, expectedChecksum: tall.checksum, salt: 9, byteOffset: 0, geometry: geometry) }
        }
    }

    /// Found by the segment-header fuzzer (strict mode): bytes in the reserved area passed
    /// when the checksum was recomputed over them.
    @Test("a segment header with nonzero reserved bytes is rejected")
    func segmentHeaderReserved() throws {
        let header = SegmentHeader(poolUUID: Array(0..<16), segmentIndex: 5, generation: 7)
        var bytes = header.encode()
        #expect(try SegmentHeader.decode(bytes, byteOffset: 0) == header)
        bytes[100] = 0xC5
        let sum = Checksum.xxh3(bytes[0..<SegmentHeaderLayout.checksumOffset])
        bytes.withUnsafeMutableBytes { $0.storeBytes(of: sum.littleEndian, toByteOffset: SegmentHeaderLayout.checksumOffset, as: UInt64.self) }
        #expect(throws: CorruptionError.self) { try SegmentHeader.decode(bytes, byteOffset: 0) }
    }

    /// Goal: decoders never trap on any bytes. Method: seeded random buffers of many
    /// lengths through every decoder; only CorruptionError may come out.
    @Test("random bytes never trap a decoder", arguments: [UInt64(1), 2, 3])
    func randomBytes(seed: UInt64) {
        var state = seed
        func next() -> UInt64 { state = state &* 6364136223846793005 &+ 1442695040888963407; return state >> 11 }
        let geometry = try! PoolGeometry.make(capacityByteCount: 64 << 20, blockByteCount: 4096, segmentByteCount: nil).get()
        for _ in 0..<300 {
            let length = Int(next() % 5000)
            var bytes = (0..<length).map { _ in UInt8(truncatingIfNeeded: next()) }
            if length > 8 && next() % 2 == 0 { bytes.replaceSubrange(0..<8, with: SuperblockLayout.magic) }
            _ = try? Superblock.decode(bytes, slotIndex: Int(next() % 2))
            _ = try? JournalRecord.decode(bytes, salt: 0, byteOffset: 0)
            _ = try? PageLayout.decode(bytes, kind: .map, level: 0, expectedChecksum: 0, salt: 0, byteOffset: 0)
            _ = try? CheckpointRoot.decode(bytes, expectedChecksum: 0, salt: 0, byteOffset: 0, geometry: geometry)
            _ = try? SegmentHeader.decode(bytes, byteOffset: 0)
        }
    }
}

extension JournalIntent: CustomTestStringConvertible {
    public var testDescription: String { "kind \(kindCode)" }
}

@Suite("Format: values that would overflow later are refused")
struct OverflowBoundTests {
    /// Review finding 5: checksummed but absurd figures must be `CorruptionError`s.
    @Test("absurd superblock figures are rejected even with a valid checksum")
    func absurdSuperblock() {
        func patched(_ offset: Int, _ value: UInt64, width: Int) -> [UInt8] {
            var bytes = sampleSuperblock(generation: 7).encode()
            withUnsafeBytes(of: value.littleEndian) { for i in 0..<width { bytes[offset + i] = $0[i] } }
            let sum = Checksum.xxh3(Array(bytes[0..<504]))
            withUnsafeBytes(of: sum.littleEndian) { for i in 0..<8 { bytes[504 + i] = $0[i] } }
            return bytes
        }
        let cases: [(String, [UInt8])] = [
            ("generation near 2^64", patched(SuperblockLayout.generationOffset, UInt64.max, width: 8)),
            ("reserve 0xFFFFFFFF", patched(SuperblockLayout.reserveSegmentCountOffset, 0xFFFF_FFFF, width: 4)),
            ("replay sequence near 2^64", patched(SuperblockLayout.journalReplaySequenceOffset, UInt64.max - 1, width: 8)),
            ("capacity far beyond the segments", patched(SuperblockLayout.capacityByteCountOffset, 1 << 50, width: 8)),
            ("tiny journal", patched(SuperblockLayout.journalByteCountOffset, 64 * 1024, width: 8)),
        ]
        for (label, bytes) in cases {
            #expect(throws: CorruptionError.self, "\(label)") { try Superblock.decode(bytes, slotIndex: 1) }
        }
    }
}
