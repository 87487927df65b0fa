import LogPoolFormat

/// The journal scanner (Specs/FORMAT.md §3): from the ring's bytes and a slot's replay
/// start to the records that follow it and why they end. A function of the bytes alone
/// (it reads through `read`, which may fail as a device does), with no engine state, so
/// a decision table checks every stop rule on its own (`JournalScannerTests`); replay
/// then applies the records and checks their data (the records' data checksums need the
/// device, J-4's last clause).
struct JournalScan {
    /// Where and why the scan stopped.
    struct Stop: Equatable {
        var kind: ReplayStopKind
        var reason: String
        var ringOffset: Int
        /// The sequence expected at `ringOffset`.
        var sequence: UInt64
        /// A record of the expected epoch and sequence was there but was torn (or
        /// unreadable), rather than a plain end of the journal.
        var torn: Bool
    }

    /// The records in order, each with its ring offset.
    var records: [(offset: Int, record: JournalRecord)] = []
    var stop: Stop
    /// The highest `durableSequence` any record carried (at least the start sequence):
    /// records below it were synced with their data.
    var durableSequence: UInt64

    /// Scans the ring from `start` (a ring offset) expecting sequence `sequence` of epoch
    /// `epoch` (J-1...J-5): records of epoch g+1 continue a stretch of epoch g (a
    /// checkpoint syncs the journal before committing g+1); any other epoch, a sequence
    /// out of order, a header that does not decode, a record past the ring's end or
    /// failing its checksum, or bytes that cannot be read end it.
    /// `read(position, count)` returns `count` ring bytes at `position` or throws.
    static func scan(ringByteCount: Int, start: Int, sequence: UInt64, epoch: UInt64, salt: UInt64,
                     read: (Int, Int) throws -> [UInt8]) -> JournalScan {
        var records: [(offset: Int, record: JournalRecord)] = []
        var scan = stream(ringByteCount: ringByteCount, start: start, sequence: sequence, epoch: epoch, salt: salt,
                          read: read) { records.append(($0, $1)) }
        scan.records = records
        return scan
    }

    /// ``scan(ringByteCount:start:sequence:epoch:salt:read:)`` handing each record to
    /// `visit` as it is decoded instead of collecting them (`records` stays empty):
    /// replay applies a full ring of small records without holding them all (a 64 MiB
    /// ring holds about 400,000). An error `visit` throws ends the scan and is rethrown.
    static func stream<E: Error>(ringByteCount: Int, start: Int, sequence: UInt64, epoch startEpoch: UInt64, salt: UInt64,
                                 read: (Int, Int) throws -> [UInt8],
                                 visit: (Int, JournalRecord) throws(E) -> Void) throws(E) -> JournalScan {
        let header = JournalRecordLayout.headerByteCount
        let sector = PoolGeometry.sectorByteCount
        var scan = JournalScan(stop: Stop(kind: .endOfRing, reason: "end of journal", ringOffset: start % ringByteCount,
                                          sequence: sequence, torn: false),
                               durableSequence: sequence)
        var position = start
        var expected = sequence
        var consumed = 0
        var epoch = startEpoch
        func stop(_ kind: ReplayStopKind, _ reason: String, torn: Bool) -> JournalScan {
            scan.stop = Stop(kind: kind, reason: reason, ringOffset: position, sequence: expected, torn: torn)
            return scan
        }
        var readFailure = ""
        func bytes(_ count: Int) -> [UInt8]? {
            do {
                return try read(position, count)
            } catch PoolError.io(let code, let operation, let at) {
                readFailure = "\(operation), errno \(code), byte offset \(at)"
            } catch {
                readFailure = "\(error)"
            }
            return nil
        }
        while consumed < ringByteCount {
            let inSector = position % sector
            if inSector != 0 && sector - inSector < header {
                consumed += sector - inSector
                position += sector - inSector
            }
            if ringByteCount - position < header {
                consumed += ringByteCount - position
                position = 0
                continue
            }
            let fileOffset = PoolGeometry.journalByteOffset + UInt64(position)
            guard let headerBytes = bytes(header) else {
                return stop(.unreadable, "record at ring offset \(position) is unreadable (\(readFailure))", torn: true)
            }
            let decoded: JournalRecord.Header
            do {
                decoded = try headerBytes.withUnsafeBytes { raw in
                    Result { () throws(CorruptionError) in try JournalRecord.decodeHeader(raw, byteOffset: fileOffset) }
                }.get()
            } catch {
                return stop(headerBytes.allSatisfy { $0 == 0 } ? .cleanEnd : .tornHeader,
                            "no valid record at ring offset \(position) (\(error.detail))", torn: false)
            }
            guard decoded.epoch == epoch || decoded.epoch == epoch + 1 else {
                return stop(.staleLap, "record at ring offset \(position) is from epoch \(decoded.epoch), not \(epoch)", torn: false)
            }
            guard decoded.sequence == expected else {
                return stop(decoded.sequence < expected ? .staleLap : .sequenceGap,
                            "record at ring offset \(position) has sequence \(decoded.sequence), expected \(expected)", torn: false)
            }
            let size = header + decoded.payloadByteCount
            guard size <= ringByteCount - position else {
                return stop(.pastRingEnd, "record at ring offset \(position) runs past the ring's end", torn: true)
            }
            guard let recordBytes = bytes(size) else {
                return stop(.unreadable, "record at ring offset \(position) is unreadable (\(readFailure))", torn: true)
            }
            let record: JournalRecord
            do {
                record = try JournalRecord.decode(recordBytes, salt: salt, byteOffset: fileOffset)
            } catch {
                return stop(.badRecordChecksum, "torn or damaged record at ring offset \(position) (\(error.detail))", torn: true)
            }
            try visit(position, record)
            epoch = record.epoch
            scan.durableSequence = max(scan.durableSequence, record.durableSequence)
            expected += 1
            consumed += size
            position += size
            if case .wrap = record.intent {
                consumed += ringByteCount - position
                position = 0
            }
        }
        scan.stop = Stop(kind: .endOfRing, reason: "end of journal", ringOffset: position % ringByteCount, sequence: expected, torn: false)
        return scan
    }
}

extension JournalScan {
    /// J-8: where replay stopped (`stop`, expecting `sequence`, in a stretch of epoch
    /// `epoch`), a recovery from that very point may have gone on with records of its own:
    /// from the next sector boundary when the stop lies inside a 512-byte sector (it never
    /// rewrites the sector holding the records it replayed), at the stop itself when that
    /// is a boundary. Such a record is of a later epoch (one more, or two: FORMAT J-8 says
    /// when) and carries exactly `sequence`: the writer numbers on from the stop, and no
    /// other writer puts that sequence of a later epoch there. At an aligned stop one more
    /// epoch is the scanner's own J-5 chaining, which stopped there for a reason, so only
    /// two more counts. The scan from that position when its first record is such a
    /// record, or nil.
    static func recoveryContinuation(ringByteCount: Int, stop: Int, sequence: UInt64, epoch: UInt64, salt: UInt64,
                                     read: (Int, Int) throws -> [UInt8]) -> JournalScan? {
        let sector = PoolGeometry.sectorByteCount
        let aligned = stop % sector == 0
        let position = aligned ? stop : (stop / sector + 1) * sector % ringByteCount
        for later in (aligned ? epoch + 2 : epoch + 1)...epoch + 2 {
            // The scan accepts `later` and the epoch after it; the first record must be
            // `later` itself for this pass (the next pass takes the one above).
            let scan = JournalScan.scan(ringByteCount: ringByteCount, start: position, sequence: sequence, epoch: later,
                                        salt: salt, read: read)
            if let first = scan.records.first, first.record.epoch == later { return scan }
        }
        return nil
    }
}
