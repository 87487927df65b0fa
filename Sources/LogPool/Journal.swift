import LogPoolFormat

/// Appends records to the journal ring (Specs/FORMAT.md §3, Specs/COMMIT.md §2).
///
/// Records are packed; before a record, a sector tail of fewer than 48 bytes is skipped,
/// and a record that does not fit before the ring's end is preceded by a `wrap` record
/// (or, with fewer than 48 bytes left, by nothing: readers wrap there too). Each sync pads
/// the tail to a 4 KiB boundary so a later batch never shares a physical sector with a
/// synced one (J-6).
struct JournalWriter {
    let ringByteCount: UInt64
    let salt: UInt64
    /// Ring offset where `buffer` will be written.
    private(set) var bufferStart: UInt64
    private(set) var buffer = ByteWriter(capacity: 64 * 1024)
    /// Ring bytes in use from the replay start up to the end of the buffer.
    private(set) var usedByteCount: UInt64 = 0
    private(set) var nextSequence: UInt64
    /// Every record below this sequence is durable.
    private(set) var durableSequence: UInt64
    /// Ring bytes of the epoch the last commit closed, from the older slot's replay start
    /// up to the current one: a fallback to that slot replays them, so new records never
    /// overwrite them (R-4, Specs/COMMIT.md §5.2).
    private(set) var keptByteCount: UInt64 = 0
    /// `usedByteCount` when the last sync completed.
    private var durableUsedByteCount: UInt64 = 0
    /// Records appended since the last commit: what a crash now leaves replay to do.
    private(set) var recordCount = 0
    var epoch: UInt64

    /// `usedByteCount`: ring bytes already holding records of this epoch before `head`
    /// (at open, what replay consumed: the recovery commit keeps them, R-4).
    init(ringByteCount: UInt64, salt: UInt64, head: UInt64, sequence: UInt64, epoch: UInt64, usedByteCount: UInt64 = 0) {
        self.ringByteCount = ringByteCount
        self.usedByteCount = usedByteCount
        self.durableUsedByteCount = usedByteCount
        self.salt = salt
        self.bufferStart = head
        self.nextSequence = sequence
        self.durableSequence = sequence
        self.epoch = epoch
    }

    var position: UInt64 { bufferStart + UInt64(buffer.byteCount) }
    var hasPendingBytes: Bool { buffer.byteCount > 0 }
    var freeByteCount: UInt64 {
        let taken = usedByteCount + keptByteCount
        return taken < ringByteCount ? ringByteCount - taken : 0
    }
    /// Ring bytes appended since the last completed sync (the batch a crash could tear).
    var unsyncedByteCount: UInt64 { usedByteCount - durableUsedByteCount }
    /// The bound on `unsyncedByteCount` after which the engine syncs on its own (J-7).
    var maxBatchByteCount: UInt64 { ringByteCount / 8 }

    /// Worst-case ring bytes one record of `payloadByteCount` can consume (sector skip,
    /// wrap waste and wrap record, end-of-batch padding).
    static func worstCaseByteCount(payloadByteCount: Int) -> UInt64 {
        let record = UInt64(JournalRecordLayout.headerByteCount + payloadByteCount)
        return 2 * record + 2 * UInt64(PoolGeometry.durableAlignmentByteCount) + UInt64(JournalRecordLayout.headerByteCount)
    }

    /// Appends a record. Returns a (ring offset, bytes) pair the caller must write first
    /// when the record wrapped the ring.
    mutating func append(_ intent: JournalIntent) -> (ringByteOffset: UInt64, bytes: [UInt8])? {
        let header = UInt64(JournalRecordLayout.headerByteCount)
        let recordByteCount = header + UInt64(intent.payloadByteCount)
        precondition(recordByteCount + header <= ringByteCount / 2, "journal record of \(recordByteCount) bytes is too large for the ring")
        skipShortSectorTail()
        var flushed: (UInt64, [UInt8])? = nil
        if ringByteCount - position < recordByteCount {
            let waste = ringByteCount - position
            if waste >= header {
                encode(.wrap)
            }
            usedByteCount += ringByteCount - position
            flushed = (bufferStart, buffer.bytes)
            buffer = ByteWriter(capacity: 64 * 1024)
            bufferStart = 0
        }
        encode(intent)
        assert(usedByteCount + keptByteCount <= ringByteCount, "journal records overran the ring bytes the older slot keeps (R-4)")
        return flushed
    }

    /// Pads to the next 4 KiB boundary and hands back the bytes to write; after the
    /// caller's fsync succeeds it calls ``markDurable()``.
    ///
    /// The batch ends on a 4 KiB boundary, not just a sector: on a device with 4 KiB
    /// physical sectors a later batch must not share (and, torn, destroy) a physical
    /// sector holding records this sync made durable.
    mutating func takeBatch() -> (ringByteOffset: UInt64, bytes: [UInt8])? {
        guard buffer.byteCount > 0 else { return nil }
        let sector = UInt64(PoolGeometry.sectorByteCount)
        let unit = UInt64(PoolGeometry.durableAlignmentByteCount)
        var remaining = (unit - position % unit) % unit
        let toSector = (sector - position % sector) % sector
        if toSector != 0 && toSector < UInt64(JournalRecordLayout.headerByteCount) {
            buffer.zeros(Int(toSector))  // readers skip a sector tail too short for a header (J-1)
            usedByteCount += toSector
            remaining -= toSector
        }
        if remaining > 0 {
            encode(.padding(byteCount: Int(remaining) - JournalRecordLayout.headerByteCount))
        }
        let batch = (bufferStart, buffer.bytes)
        bufferStart = position % ringByteCount
        buffer = ByteWriter(capacity: 64 * 1024)
        return batch
    }

    /// Hands back buffered bytes without padding (a large buffer is written early; it is
    /// still not durable until the next sync). Only whole sectors are taken so the next
    /// write never rewrites a sector already written.
    mutating func takeFullSectors() -> (ringByteOffset: UInt64, bytes: [UInt8])? {
        let sector = PoolGeometry.sectorByteCount
        let whole = (buffer.byteCount / sector) * sector
        guard whole > 0, bufferStart % UInt64(sector) == 0 else { return nil }
        let bytes = buffer.bytes
        let batch = (bufferStart, Array(bytes[0..<whole]))
        var rest = ByteWriter(capacity: 64 * 1024)
        rest.append(Array(bytes[whole...]))
        buffer = rest
        bufferStart += UInt64(whole)
        return batch
    }

    mutating func markDurable() {
        durableSequence = nextSequence
        durableUsedByteCount = usedByteCount
    }

    /// After an fsync that ran outside the lock: durable through `sequence` (exclusive)
    /// with `usedByteCount` ring bytes, if that is news in this epoch (a checkpoint or a
    /// sync under the lock may have covered more meanwhile).
    mutating func markDurable(through sequence: UInt64, usedByteCount used: UInt64, epoch: UInt64) {
        guard epoch == self.epoch, sequence > durableSequence else { return }
        durableSequence = sequence
        durableUsedByteCount = used
    }

    /// After a checkpoint commits, replay starts at `position` (sector aligned, nothing
    /// buffered) with the new epoch. The epoch just closed stays in the ring, untouched,
    /// until the next commit (``keptByteCount``); everything before it is history.
    mutating func resetAfterCheckpoint(epoch: UInt64) {
        precondition(buffer.byteCount == 0, "checkpoint with unwritten journal bytes")
        keptByteCount = usedByteCount
        usedByteCount = 0
        recordCount = 0
        durableUsedByteCount = 0
        self.epoch = epoch
        durableSequence = nextSequence
    }

    private mutating func skipShortSectorTail() {
        let sector = UInt64(PoolGeometry.sectorByteCount)
        let tail = position % sector
        guard tail != 0 else { return }
        let remaining = sector - tail
        if remaining < UInt64(JournalRecordLayout.headerByteCount) {
            buffer.zeros(Int(remaining))
            usedByteCount += remaining
        }
    }

    private mutating func encode(_ intent: JournalIntent) {
        let record = JournalRecord(sequence: nextSequence, epoch: epoch, durableSequence: durableSequence, intent: intent)
        let before = buffer.byteCount
        record.encode(salt: salt, into: &buffer)
        usedByteCount += UInt64(buffer.byteCount - before)
        nextSequence += 1
        recordCount += 1
    }
}
