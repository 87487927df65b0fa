@testable import LogPool
import LogPoolFormat
import Testing

/// The journal scanner on its own (issue 11): a decision table of ring contents against
/// the stop it must report (FORMAT.md J-1...J-5), as SlotMatrixTests does for the
/// superblock choice. Rings are built in memory with the writer's placement rules.
@Suite("Journal scanner")
struct JournalScannerTests {
    static let salt: UInt64 = 0x5EED_0001
    static let epoch: UInt64 = 5

    /// A record of `epoch` with `sequence` (a delete: 56 bytes).
    static func record(_ sequence: UInt64, epoch: UInt64 = epoch, durable: UInt64 = 0, intent: JournalIntent = .delete(id: 7)) -> [UInt8] {
        JournalRecord(sequence: sequence, epoch: epoch, durableSequence: durable, intent: intent).encode(salt: salt)
    }

    /// Lays `records` out from `start` as the writer does (J-1: a header never starts in
    /// the last 47 bytes of a sector; J-2: nor in the last 47 bytes of the ring), and
    /// returns the ring and each record's offset.
    static func ring(_ records: [[UInt8]], byteCount: Int = 64 * 1024, start: Int = 0) -> (bytes: [UInt8], offsets: [Int]) {
        var bytes = [UInt8](repeating: 0, count: byteCount)
        var offsets: [Int] = []
        var position = start
        for record in records {
            let inSector = position % 512
            if inSector != 0 && 512 - inSector < JournalRecordLayout.headerByteCount { position += 512 - inSector }
            if byteCount - position < JournalRecordLayout.headerByteCount { position = 0 }
            bytes.replaceSubrange(position..<position + record.count, with: record)
            offsets.append(position)
            position += record.count
        }
        return (bytes, offsets)
    }

    static func scan(_ ring: [UInt8], start: Int = 0, sequence: UInt64 = 1, unreadable: Range<Int>? = nil) -> JournalScan {
        JournalScan.scan(ringByteCount: ring.count, start: start, sequence: sequence, epoch: epoch, salt: salt) { position, count in
            if let unreadable, unreadable.overlaps(position..<position + count) {
                throw PoolError.io(errno: 5, operation: "pread", byteOffset: UInt64(position))
            }
            return Array(ring[position..<position + count])
        }
    }

    struct Case: CustomTestStringConvertible, Sendable {
        var name: String
        var build: @Sendable () -> (ring: [UInt8], unreadable: Range<Int>?)
        var kind: ReplayStopKind
        var records: Int
        var torn: Bool
        var testDescription: String { name }
    }

    static let cases: [Case] = [
        Case(name: "records then zeros: clean end", build: { (ring((1...3).map { record($0) }).bytes, nil) },
             kind: .cleanEnd, records: 3, torn: false),
        Case(name: "an empty ring: clean end at once", build: { ([UInt8](repeating: 0, count: 64 * 1024), nil) },
             kind: .cleanEnd, records: 0, torn: false),
        Case(name: "garbage where a header would start: torn header", build: {
            var (bytes, offsets) = ring((1...2).map { record($0) } + [record(3)])
            for i in offsets[2]..<offsets[2] + 48 { bytes[i] = UInt8(truncatingIfNeeded: i &* 37 &+ 11) }
            return (bytes, nil)
        }, kind: .tornHeader, records: 2, torn: false),
        Case(name: "an older epoch: stale lap", build: { (ring([record(1), record(2), record(3, epoch: 3)]).bytes, nil) },
             kind: .staleLap, records: 2, torn: false),
        Case(name: "the next epoch chains on (J-5)", build: { (ring([record(1), record(2), record(3, epoch: 6), record(4, epoch: 6)]).bytes, nil) },
             kind: .cleanEnd, records: 4, torn: false),
        Case(name: "two epochs ahead: stale lap", build: { (ring([record(1), record(2, epoch: 7)]).bytes, nil) },
             kind: .staleLap, records: 1, torn: false),
        Case(name: "back to the previous epoch after chaining: stale lap", build: { (ring([record(1, epoch: 6), record(2)]).bytes, nil) },
             kind: .staleLap, records: 1, torn: false),
        Case(name: "a sequence ahead: sequence gap", build: { (ring([record(1), record(2), record(5)]).bytes, nil) },
             kind: .sequenceGap, records: 2, torn: false),
        Case(name: "a sequence behind: stale lap", build: { (ring([record(1), record(2), record(1)]).bytes, nil) },
             kind: .staleLap, records: 2, torn: false),
        Case(name: "a flipped payload byte: bad record checksum", build: {
            var (bytes, offsets) = ring((1...3).map { record($0) })
            bytes[offsets[1] + 50] ^= 0x40
            return (bytes, nil)
        }, kind: .badRecordChecksum, records: 1, torn: true),
        Case(name: "a record that would run past the ring's end", build: {
            var (bytes, offsets) = ring((1...2).map { record($0) })
            let at = offsets[1] + JournalRecordLayout.payloadByteCountOffset
            bytes.withUnsafeMutableBytes { $0.storeBytes(of: UInt32(70_000).littleEndian, toByteOffset: at, as: UInt32.self) }
            return (bytes, nil)
        }, kind: .pastRingEnd, records: 1, torn: true),
        Case(name: "an unreadable record: unreadable", build: {
            let (bytes, offsets) = ring((1...3).map { record($0) })
            return (bytes, offsets[2]..<offsets[2] + 1)
        }, kind: .unreadable, records: 2, torn: true),
        Case(name: "a wrap record continues at offset 0", build: {
            // Records near the ring's end, a wrap, then more from offset 0.
            let size = 4096
            var bytes = [UInt8](repeating: 0, count: size)
            let tail = [record(1), record(2), record(3, intent: .wrap)]
            var at = size - 512
            for r in tail {
                bytes.replaceSubrange(at..<at + r.count, with: r)
                at += r.count
            }
            let head = [record(4), record(5)]
            at = 0
            for r in head {
                bytes.replaceSubrange(at..<at + r.count, with: r)
                at += r.count
            }
            return (bytes, nil)
        }, kind: .cleanEnd, records: 5, torn: false),
        Case(name: "records all the way round: end of ring", build: {
            let size = 4096
            var records: [[UInt8]] = []
            var position = 0, sequence: UInt64 = 1
            while true {
                let inSector = position % 512
                if inSector != 0 && 512 - inSector < 48 { position += 512 - inSector }
                guard size - position >= 56 else { break }
                records.append(record(sequence))
                position += 56
                sequence += 1
            }
            return (ring(records, byteCount: size).bytes, nil)
        }, kind: .endOfRing, records: 72, torn: false),
    ]

    @Test("decision table: ring contents against the stop reported", arguments: cases)
    func decisionTable(_ c: Case) {
        let (bytes, unreadable) = c.build()
        let start = c.name.hasPrefix("a wrap") ? bytes.count - 512 : 0
        let result = Self.scan(bytes, start: start, unreadable: unreadable)
        #expect(result.stop.kind == c.kind, "\(c.name): \(result.stop.reason)")
        #expect(result.records.count == c.records, "\(c.name): \(result.records.count) records, \(result.stop.reason)")
        #expect(result.stop.torn == c.torn, "\(c.name)")
        #expect(result.stop.sequence == 1 + UInt64(result.records.count), "\(c.name): the stop names the sequence expected there")
        // The records come back in order with consecutive sequences.
        #expect(result.records.map(\.record.sequence) == (0..<UInt64(result.records.count)).map { $0 + 1 })
    }

    @Test("the highest durable mark any record carries is reported")
    func durableMark() {
        let (bytes, _) = Self.ring([Self.record(1, durable: 1), Self.record(2, durable: 2), Self.record(3, durable: 2)])
        let result = Self.scan(bytes)
        #expect(result.durableSequence == 2 && result.records.count == 3)
    }

    @Test("a scan from the middle of the ring finds the records from there on")
    func startInMiddle() {
        let (bytes, offsets) = Self.ring((7...9).map { Self.record($0) }, start: 8192)
        let result = Self.scan(bytes, start: offsets[0], sequence: 7)
        #expect(result.records.map(\.offset) == offsets && result.stop.kind == .cleanEnd)
    }

    /// J-8: what a stop at `stop` (expecting sequence 3 in a stretch of epoch 5) goes on
    /// with, when a record of `epoch` and `sequence` sits at ring offset 512.
    @Test("recovery continuation (J-8): a later epoch's record with the expected sequence at the next boundary",
          arguments: [
              (stop: 112, epoch: 6 as UInt64, sequence: 3 as UInt64, continues: true),
              (stop: 112, epoch: 7, sequence: 3, continues: true),
              (stop: 112, epoch: 8, sequence: 3, continues: false),
              (stop: 112, epoch: 5, sequence: 3, continues: false),
              (stop: 112, epoch: 4, sequence: 3, continues: false),
              (stop: 112, epoch: 6, sequence: 4, continues: false),
              (stop: 112, epoch: 6, sequence: 2, continues: false),
              (stop: 512, epoch: 6, sequence: 3, continues: false),
              (stop: 512, epoch: 7, sequence: 3, continues: true),
              (stop: 400, epoch: 6, sequence: 3, continues: true),
          ])
    func recoveryContinuation(stop: Int, epoch: UInt64, sequence: UInt64, continues: Bool) {
        var (bytes, _) = Self.ring([Self.record(1), Self.record(2)])
        // Torn bytes from the stop to the sector's end, then the later records.
        for i in 112..<512 { bytes[i] = UInt8(truncatingIfNeeded: i &* 13 &+ 5) }
        let later = [Self.record(sequence, epoch: epoch), Self.record(sequence + 1, epoch: epoch)]
        bytes.replaceSubrange(512..<512 + later[0].count, with: later[0])
        bytes.replaceSubrange(512 + later[0].count..<512 + later[0].count + later[1].count, with: later[1])
        let result = JournalScan.recoveryContinuation(ringByteCount: bytes.count, stop: stop, sequence: 3, epoch: Self.epoch, salt: Self.salt) { position, count in
            Array(bytes[position..<position + count])
        }
        #expect((result != nil) == continues, "stop \(stop), a record of epoch \(epoch) sequence \(sequence) at 512")
        if let result {
            #expect(result.records.map(\.offset) == [512, 512 + later[0].count] && result.stop.kind == .cleanEnd)
        }
    }
}
