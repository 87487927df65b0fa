import Foundation
import LogPool
import LogPoolFormat
import LogPoolTesting
import Testing

/// The journal tail matrix of Specs/CRASH-MODEL.md §6: the last of three records
/// {complete, torn header, torn payload, bad XXH3, its data torn, sequence gap, a valid
/// record of an earlier lap, another pool's record} × where it sits {mid-sector, at a
/// sector boundary (after a sector tail too short for a header), after a ring wrap},
/// at 512- and 4096-byte physical sectors (at 4096 a tear garbles the rest of the
/// physical sector too). Records are written into a real pool's ring by hand (FORMAT
/// J-1..J-3 placement) and the chosen slot is re-pointed at the first one. Each record
/// renames volume 1 ("v" → "n1" → "n2" → "n3"), so the name read back after recovery
/// says exactly where replay stopped.
@Suite("Journal tail matrix")
struct JournalTailMatrixTests {
    enum Last: String, CaseIterable {
        case complete, tornHeader = "torn-header", tornPayload = "torn-payload", badChecksum = "bad-xxh3"
        case dataTorn = "data-torn", sequenceGap = "sequence-gap", staleLap = "stale-lap", otherPool = "other-pool"
    }
    enum Position: String, CaseIterable { case midSector = "mid-sector", sectorBoundary = "sector-boundary", afterWrap = "after-wrap" }

    /// Expected name after recovery and why replay stopped, per last-record kind (the
    /// same at every position: the position changes where records lie, not the rule).
    static let expected: [Last: (name: String, stop: [ReplayStopKind])] = [
        .complete: ("n3", [.cleanEnd, .staleLap, .tornHeader, .sequenceGap]),
        .tornHeader: ("n2", [.tornHeader]),
        .tornPayload: ("n2", [.badRecordChecksum, .pastRingEnd]),
        .badChecksum: ("n2", [.badRecordChecksum]),
        .dataTorn: ("n2", [.badDataChecksum]),
        .sequenceGap: ("n2", [.sequenceGap]),
        .staleLap: ("n2", [.staleLap]),
        .otherPool: ("n2", [.badRecordChecksum]),
    ]

    @Test("every kind of last record at every position stops replay where the table says",
          arguments: [512, 4096])
    func matrix(sector: Int) throws {
        var failures: [String] = []
        for position in Position.allCases {
            for last in Last.allCases {
                let image = try Self.build(last: last, position: position, sector: sector, badMiddle: nil)
                let pool = try Pool.open(on: SimulatedDevice(image: image))
                let names = try pool.list().map(\.name)
                let report = pool.recoveryReport
                let (name, stops) = Self.expected[last]!
                if names != [name] || !stops.contains(report.replayStopKind) {
                    failures.append("\(last.rawValue) \(position.rawValue): read \(names), stop \(report.replayStopKind.rawValue) (\(report.replayStopReason)); expected [\(name)], \(stops.map(\.rawValue))")
                }
                let verify = try Pool.verify(on: SimulatedDevice(image: image))
                if !verify.isClean { failures.append("\(last.rawValue) \(position.rawValue): verify \(verify.problems)") }
            }
        }
        #expect(failures.isEmpty, "sector \(sector):\n\(failures.joined(separator: "\n"))")
    }

    /// A bad record followed by a valid one: within one sync batch (the valid record's
    /// `durableSequence` does not pass the bad one) it is a torn tail and replay stops
    /// there; when the valid record proves the bad one was synced, it is damage:
    /// `corrupt(journal record)` at open and `journal-synced-damage` in verify (J-7).
    @Test("a bad record followed by a valid one: torn tail within its batch, corrupt when proven synced",
          arguments: Position.allCases)
    func badThenValid(position: Position) throws {
        let torn = try Self.build(last: .complete, position: position, sector: 512, badMiddle: false)
        let pool = try Pool.open(on: SimulatedDevice(image: torn))
        #expect(try pool.list().map(\.name) == ["n1"])
        let synced = try Self.build(last: .complete, position: position, sector: 512, badMiddle: true)
        expectCorrupt("journal record") { _ = try Pool.open(on: SimulatedDevice(image: synced)) }
        let report = try Pool.verify(on: SimulatedDevice(image: synced))
        #expect(report.problems.contains { $0.code == "journal-synced-damage" }, "\(report.problems)")
    }

    /// A pool with volume "v" (id 1), checkpointed, whose ring then holds three rename
    /// records placed at `position`, the last one made `last`. `badMiddle`: nil, or the
    /// middle record garbled with the last one's `durableSequence` before (false) or
    /// past (true) it.
    static func build(last: Last, position: Position, sector: Int, badMiddle: Bool?) throws -> [UInt8] {
        let (pool, device) = try makePool()
        try pool.createVolume(name: "v", size: 1 << 20)
        try pool.checkpoint()
        var image = device.durable
        let slots = PoolGeometry.superblockSlotByteOffsets.map { Int($0) }
        var sb = try #require(WriteChecks.newestSlot(image))
        let ring = Int(sb.geometry.journalByteCount), salt = sb.poolSalt
        let header = JournalRecordLayout.headerByteCount
        let first = sb.journalReplaySequence, epoch = sb.generation
        func rename(_ k: Int) -> JournalIntent { .rename(id: 1, name: "n\(k)") }
        let size = JournalRecord(sequence: 0, epoch: 0, durableSequence: 0, intent: rename(1)).encodedByteCount
        // Where r1 starts. Replay starts 4 KiB aligned (as every batch does), so a padding
        // record fills the gap up to r1.
        let firstOffset: Int
        switch position {
        case .midSector: firstOffset = Int(sb.journalReplayByteOffset)
        case .sectorBoundary: firstOffset = 8192 + 512 - 2 * size - 20  // 20 bytes left after r2: r3 at the next sector
        case .afterWrap: firstOffset = ring - size - 50  // 50 bytes left after r1: a wrap record, then r2 at 0
        }
        let start = firstOffset / 4096 * 4096
        var placed: [(offset: Int, record: JournalRecord)] = []
        var position = start, sequence = first
        if firstOffset > start {
            placed.append((start, JournalRecord(sequence: sequence, epoch: epoch, durableSequence: first,
                                                intent: .padding(byteCount: firstOffset - start - header))))
            sequence += 1
            position = firstOffset
        }
        // Place the records (J-1 sector tails, J-2/J-3 wrap), sequences consecutive. With
        // `badMiddle` set, r3 starts a new batch at the next 4 KiB boundary, as a record
        // written after a later sync would.
        for k in 1...3 {
            if k == 3, badMiddle != nil { position = (position + 4095) / 4096 * 4096 % ring }
            let inSector = position % 512
            if inSector != 0 && 512 - inSector < header { position += 512 - inSector }
            if ring - position < size {
                if ring - position >= header {
                    placed.append((position, JournalRecord(sequence: sequence, epoch: epoch, durableSequence: first, intent: .wrap)))
                    sequence += 1
                }
                position = 0
            }
            placed.append((position, JournalRecord(sequence: sequence, epoch: epoch, durableSequence: first, intent: rename(k))))
            sequence += 1
            position += size
        }
        // Clear the ring stretch the records use (no stale bytes in between), then write.
        let journal = Int(PoolGeometry.journalByteOffset)
        for (offset, record) in placed {
            image.replaceSubrange(journal + offset..<journal + offset + record.encodedByteCount,
                                  with: [UInt8](repeating: 0, count: record.encodedByteCount))
        }
        var lastRecord = placed[placed.count - 1]
        var generator = SeededGenerator(seed: UInt64(sector) &* 31 &+ UInt64(Last.allCases.firstIndex(of: last)!))
        func garble(_ from: Int, _ count: Int) {
            // At a 4 KiB physical sector a torn write garbles the rest of that sector too.
            let end = sector > 512 ? (from / sector + 1) * sector : from + count
            for i in from..<end { image[i] = UInt8.random(in: 0...255, using: &generator) }
        }
        var bytes = lastRecord.record.encode(salt: salt)
        switch last {
        case .sequenceGap: lastRecord.record.sequence += 5; bytes = lastRecord.record.encode(salt: salt)
        case .staleLap:
            lastRecord.record.sequence /= 2
            lastRecord.record.epoch -= 1
            bytes = lastRecord.record.encode(salt: salt)
        case .otherPool: bytes = lastRecord.record.encode(salt: salt ^ 0x5EED)
        case .dataTorn:
            let dataOffset = sb.geometry.segmentByteOffset(Int(sb.geometry.segmentCount) - 1) + 4096
            let mapping = BlockMapping(blockIndex: 0, blockID: 1, location: BlockLocation(byteOffset: dataOffset, storedByteCount: 4096, flags: 0, checksum: 0x1234_5678))
            lastRecord.record.intent = .map(volumeID: 1, unmapRanges: [], mappings: [mapping])
            bytes = lastRecord.record.encode(salt: salt)
        default: break
        }
        for (offset, record) in placed.dropLast() {
            image.replaceSubrange(journal + offset..<journal + offset + record.encodedByteCount, with: record.encode(salt: salt))
        }
        if let proven = badMiddle {
            // The last record carries a durable mark past the (garbled) middle one, or not.
            var record = lastRecord.record
            record.durableSequence = proven ? record.sequence : first
            bytes = record.encode(salt: salt)
            let middle = placed[placed.count - 2]
            image[journal + middle.offset + header + 2] ^= 0x40
        }
        image.replaceSubrange(journal + lastRecord.offset..<journal + lastRecord.offset + bytes.count, with: bytes)
        switch last {
        case .tornHeader: garble(journal + lastRecord.offset, header)
        case .tornPayload: garble(journal + lastRecord.offset + header, bytes.count - header)
        case .badChecksum: image[journal + lastRecord.offset + JournalRecordLayout.checksumOffset] ^= 0x01
        default: break
        }
        // Re-point the chosen slot's replay start at the first record.
        sb.journalReplayByteOffset = UInt64(start)
        image.replaceSubrange(slots[sb.slotIndex]..<slots[sb.slotIndex] + 512, with: sb.encode())
        return image
    }
}
