import Foundation
import LogPoolFormat
import Synchronization

/// The single-threaded heart of a pool. ``Pool`` serialises every call with a lock.
///
/// Invariants (Specs/COMMIT.md):
/// - a segment in state `.free` holds nothing that the durable superblock, its checkpoint
///   or any journal record after its replay start references (reuse rule R-1);
/// - `dataLiveByteCounts[s]` is the sector-rounded stored size of every referenced block in
///   segment s; `metaLiveByteCounts[s]` is the pages and root of the durable checkpoint in s;
/// - every admitted operation leaves room for the next checkpoint: free appendable bytes ≥
///   reserve + (dirty pages + root) (promise 4, "full pool fails cleanly").
final class Engine {
    let device: BlockDevice
    let readOnly: Bool
    var superblock: Superblock
    let geometry: PoolGeometry
    let salt: UInt64
    let blockByteCount: Int
    let compression: CompressionMode

    // Volumes: the catalog (``VolumeCatalog``) owns them, their names, the next id, the
    // root's row bytes and the release queue; only `apply` and open change it.
    var catalog = VolumeCatalog()
    var volumes: [UInt64: VolumeState] { catalog.byID }
    var volumeIDsByName: [String: UInt64] { catalog.idsByName }
    var nextVolumeID: UInt64 { catalog.nextID }
    /// Bytes the volume rows take in the checkpoint root, so admission sizes the next root
    /// in O(1) (building the root on every write made writes 6x slower with 1,000
    /// snapshots).
    var volumeRowByteTotal: Int { catalog.rowByteTotal }
    /// Maps of deleted volumes still being released, oldest first (``reclaimStep()``).
    var releaseQueue: [QueuedMap] { catalog.releaseQueue }
    /// A release step is being admitted or journaled (no other starts inside it).
    var reclaiming = false
    /// Queued maps whose next step could not read a map leaf (damage): skipped for the
    /// rest of this session, so the other queued maps are still released.
    var stuckQueueIDs = Set<UInt64>()

    // Block table: block id → location. Refcounts are stored (Specs/FORMAT.md §5.4).
    var blockTable: Tree
    /// Nodes in the block table (it only ever grows).
    var blockTableNodeCount = 0
    /// Refcounts (paged: their leaves read on use, ``storedRefcountWords(_:)``), the live
    /// count and the allocation sweep. Changed only through its methods. Locations live
    /// only in the block table's leaves.
    var ids = BlockIDs()
    /// While counts are derived from the maps (``deriveRefcounts()``), a leaf not yet
    /// resident counts zero instead of being read from the refcount tree.
    var derivingCounts = false
    /// A refcount leaf could not be read or failed its checks since open (an open that
    /// meets this during replay opens again, deriving the counts).
    var refcountLeafDamaged = false
    /// Checkpoints started because too many leaves were dirty (``dirtyPageBound``).
    var dirtyBoundCheckpointCount = 0
    /// Times the counts were rebuilt from the maps after open because a refcount leaf was
    /// damaged (``rebuildRefcountsFromMaps()``).
    var liveRefcountRebuildCount = 0
    /// Refcount leaves resident at most beside those changed or pinned: an eighth of
    /// the metadata cache's budget.
    var refcountBudgetLeafCount: Int { max(1, pageCache.budgetPageCount / 8) }
    /// The block table's leaves in bounded memory (read on demand, clean ones evicted).
    let pageCache: PageCache
    /// The lazily created leaves of the level-1 nodes open read (``LeafGroup``).
    var leafRegistry = LeafRegistry(pages: [], poison: PoisonState())
    var blockIDLimit: UInt64 { ids.limit }
    /// The stored refcounts (FORMAT §5.4): interior nodes resident, leaves without words
    /// (``ids`` holds the resident counts) except while a checkpoint writes them.
    var refcountTree = Tree(kind: .refcounts, root: nil, height: 1)
    /// Nodes in the refcount tree (it only ever grows).
    var refcountNodeCount = 0
    var liveBlockCount: Int { ids.liveCount }

    // Segments: states, live bytes, the allocator (Specs/COMMIT.md §5). Changed only
    // through its methods; the properties below read it.
    var space: SegmentSpace
    var segmentStates: [SegmentState] { space.states }
    var dataLiveByteCounts: [UInt64] { space.dataLive }
    var metaLiveByteCounts: [UInt64] { space.metaLive }
    var dataLiveTotal: UInt64 { space.dataLiveTotal }
    var metaLiveTotal: UInt64 { space.metaLiveTotal }
    var freeSegments: [Int] { space.freeSegments }
    var openSegment: Int? { space.openSegment }
    var appendByteOffset: UInt64 { space.appendByteOffset }
    var holes: [(byteOffset: UInt64, byteCount: UInt64)] { space.holes }
    /// The durable checkpoint root's extent.
    var checkpointExtent: (byteOffset: UInt64, byteCount: UInt64)?

    // Metadata pages.
    var dirtyPageCount = 0
    /// Of those, map and block-table leaves: what the metadata cache must keep beyond
    /// its budget (dirty leaves are pinned), so what the dirty bound counts (COMMIT §3.1).
    var dirtyLeafCount = 0
    /// Records one epoch may hold before a checkpoint starts on its own
    /// (``defaultReplayRecordBound``; tests lower it).
    var replayRecordBound = Engine.defaultReplayRecordBound
    /// Block-table leaves holding no referenced id whose damaged page a write replaced
    /// with an empty leaf (``makeResident(_:firstSlot:)``), since open.
    var replacedDamagedTableLeafCount = 0
    /// Pages of the durable checkpoint that the in-memory state no longer references;
    /// they stop counting as live when the next checkpoint commits.
    var pendingPageReleases: [UInt64] = []

    // Journal ring.
    var journal: JournalWriter

    /// Set while a volume write runs under the writers' mutex alone (``Pool/writerLocked(_:)``):
    /// the lock ``exclusively(_:)`` takes around changes readers plan from. Nil when the
    /// caller holds the whole lock.
    var exclusiveLock: PoolLock? = nil

    /// Runs `body` with the read-write lock held exclusively (COMMIT §7.3): everything
    /// that changes what reads plan from (volumes, maps, block ids and locations) and
    /// everything that makes space reusable (checkpoints, compaction, holes) runs inside.
    /// A no-op when the caller already holds the whole lock; nests.
    func exclusively<T>(_ body: () throws -> T) rethrows -> T {
        guard let lock = exclusiveLock else { return try body() }
        lock.enterExclusive()
        exclusiveLock = nil
        defer {
            exclusiveLock = lock
            lock.leaveExclusive()
        }
        return try body()
    }

    /// A device write happened since the last device sync.
    var deviceDirty = false
    /// A ``Pool/sync()`` is in its fsync outside the pool's lock (group commit, COMMIT §7).
    var syncInFlight = false
    /// Reads executing outside the pool's lock (``ReadPlan``).
    let readers = ReaderGate()
    /// Background payload writer (pools on files opened read-write); nil = every write is
    /// synchronous. `writeBehindPending` is set while writes may be queued in it.
    private(set) var writeBehind: WriteBehind? = nil
    /// Atomic: set by a volume write under the writers' mutex alone, read by reads
    /// planning under the shared lock (a set flag sends them to the whole lock to drain).
    private let writeBehindFlag = Atomic<Bool>(false)
    var writeBehindPending: Bool {
        get { writeBehindFlag.load(ordering: .acquiring) }
        set { writeBehindFlag.store(newValue, ordering: .releasing) }
    }

    // Failure state (``PoisonState``): a volume write, or a reader that found a page
    // named at two places (``LeafRegistry``), can poison the pool while reads (under the
    // shared lock only) check it.
    let poison = PoisonState()
    var poisonCause: String? {
        get { poison.cause }
        set { poison.cause = newValue }
    }
    var isClosed = false

    /// What open found and did (superblock choice, replay stop, usage mismatches).
    var recoveryReport = RecoveryReport()

    /// Segments that journal replay wrote into (their headers are checked at open).
    var replayWrittenSegments = Set<Int>()
    /// Where the durable root says appends stopped (0 = nowhere to resume): a clean open
    /// resumes there (``resumeStoredAppendPoint()``).
    var storedResumeByteOffset: UInt64 = 0
    /// The epoch of the last record replay applied (J-7 looks for synced records up to two
    /// epochs past it).
    var replayLastEpoch: UInt64 = 0
    /// Data extents that journal records wrote since the last commit (coalesced where
    /// appends run on). At the next commit they become ``fallbackExtents``.
    var epochWrittenExtents: [(byteOffset: UInt64, byteCount: UInt64)] = []
    /// Data extents written by the records of the epoch the last commit closed: the
    /// older superblock slot replays those records after a fallback (the newer slot
    /// damaged) and checks their data, so they are not reused, as holes or as free
    /// segments, until the next commit overwrites that slot (R-4, Specs/COMMIT.md §5.2).
    var fallbackExtents: [(byteOffset: UInt64, byteCount: UInt64)] = []
    /// The segments of ``fallbackExtents``: not freed while they are kept.
    var fallbackSegments = Set<Int>()
    /// Data bytes journaled since the last completed sync (the J-7 batch bound).
    var unsyncedDataByteCount: UInt64 = 0

    /// The durable root's stored segment usage differs from the rebuilt figures, so the
    /// next checkpoint writes a new root even when nothing else changed (repair).
    var rootNeedsRewrite = false

    /// Figures kept for `stats` and tests.
    var checkpointCount = 0
    var compactionMovedByteCount: UInt64 = 0
    var writtenDataByteCount: UInt64 = 0

    /// The block-table cache's budget when the caller names none: 64 MiB, the leaves of
    /// about 2.8 million blocks (11 GiB of 4 KiB blocks) resident at once.
    static let defaultMetadataCacheByteCount = 64 << 20

    /// A budget that replaces every engine's in this process (``Pool/overrideMetadataCacheBytes(_:)``).
    static let metadataCacheOverride = Mutex<Int?>(nil)

    init(device: BlockDevice, superblock: Superblock, readOnly: Bool, metadataCacheByteCount: Int = Engine.defaultMetadataCacheByteCount) {
        self.device = device
        pageCache = PageCache(budgetByteCount: Engine.metadataCacheOverride.withLock { $0 } ?? metadataCacheByteCount)
        self.readOnly = readOnly
        self.superblock = superblock
        self.geometry = superblock.geometry
        self.salt = superblock.poolSalt
        self.blockByteCount = Int(superblock.geometry.blockByteCount)
        self.compression = superblock.compression
        space = SegmentSpace(geometry: superblock.geometry)
        blockTable = Tree(kind: .blockTable, root: nil, height: 1)
        checkpointExtent = (superblock.checkpointByteOffset, superblock.checkpointByteCount)
        journal = JournalWriter(ringByteCount: superblock.geometry.journalByteCount, salt: superblock.poolSalt,
                                head: superblock.journalReplayByteOffset, sequence: superblock.journalReplaySequence,
                                epoch: superblock.generation)
    }

    // MARK: - Guards

    func checkUsable() throws {
        if isClosed { throw PoolError.closed }
        if let cause = poisonCause { throw PoolError.poisoned(cause) }
    }

    func checkWritable() throws {
        try checkUsable()
        if readOnly { throw PoolError.readOnly("the pool was opened read-only") }
    }

    /// Runs a device call and poisons the engine if it fails (STYLE §4: after a failed
    /// write or fsync nothing is retried; reopen and recover).
    ///
    /// Queued write-behind payloads reach the device first, so the device sees every
    /// operation in program order.
    func deviceCall<T>(_ body: () throws -> T) throws -> T {
        do {
            if writeBehindPending, let writeBehind {
                try writeBehind.drain()
                writeBehindPending = false
            }
            return try body()
        } catch let error as PoolError {
            poisonCause = error.description
            throw error
        }
    }

    /// Writes through the device, poisoning on failure and noting that a sync is due.
    func deviceWrite(_ bytes: [UInt8], at byteOffset: UInt64) throws {
        try bytes.withUnsafeBytes { try deviceWrite($0, at: byteOffset) }
    }

    func deviceWrite(_ bytes: UnsafeRawBufferPointer, at byteOffset: UInt64) throws {
        deviceDirty = true
        try deviceCall { try device.write(bytes, at: byteOffset) }
    }

    func deviceWrite(_ batch: WriteBatch) throws {
        deviceDirty = true
        try deviceCall { try batch.write(to: device) }
    }

    /// Block payloads of one write: queued to the write-behind thread when there is one
    /// and the payload is large (the direct runs are copied, they borrow the caller's
    /// buffer), else written now. Small payloads gain nothing from the overlap and would
    /// pay a thread hand-off each.
    func deviceWritePayload(_ batch: WriteBatch, direct: [(byteOffset: UInt64, bytes: UnsafeRawBufferPointer)]) throws {
        let byteCount = batch.runs.reduce(0) { $0 + $1.bytes.count } + direct.reduce(0) { $0 + $1.bytes.count }
        guard let writeBehind, byteCount >= WriteBehind.minimumByteCount else {
            try deviceWrite(batch)
            for run in direct { try deviceWrite(run.bytes, at: run.byteOffset) }
            return
        }
        deviceDirty = true
        writeBehindPending = true
        do {
            for run in batch.runs { try writeBehind.enqueue(run.bytes, at: run.byteOffset) }
            for run in direct { try writeBehind.enqueue(copying: run.bytes, at: run.byteOffset) }
        } catch let error as PoolError {
            poisonCause = error.description
            throw error
        }
    }

    /// Starts the write-behind thread (``Pool`` does for files opened read-write).
    func enableWriteBehind() {
        guard !readOnly, writeBehind == nil else { return }
        writeBehind = WriteBehind(device: device)
    }

    /// Lets queued payloads reach the device and stops the thread; before the device is
    /// closed or dropped. A write failure found here poisons the engine.
    func stopWriteBehind() {
        guard let writeBehind else { return }
        if writeBehindPending {
            do { try writeBehind.drain() } catch { poisonCause = poisonCause ?? "\(error)" }
            writeBehindPending = false
        }
        writeBehind.shutdown()
        self.writeBehind = nil
    }

    deinit { writeBehind?.shutdown() }

    /// fdatasync, skipped when nothing was written since the last one.
    func deviceSync() throws {
        guard deviceDirty else { return }
        try deviceCall { try device.sync() }
        deviceDirty = false
        alignAfterSync()
    }

    /// What a sync ends with, whether its fsync ran under the lock (``deviceSync()``) or
    /// outside it (``beginSync()``, before the fsync is issued: nothing is written in
    /// between, and writes made while it runs must start beyond what it covers).
    func alignAfterSync() {
        space.alignAfterSync()
    }

    // MARK: - Geometry helpers

    func blockCount(sizeByteCount: UInt64) -> UInt64 {
        (sizeByteCount + UInt64(blockByteCount) - 1) / UInt64(blockByteCount)
    }

    func segment(of byteOffset: UInt64) -> Int { space.segment(of: byteOffset) }

    var reserveByteCount: UInt64 { UInt64(geometry.reserveSegmentCount) * UInt64(geometry.segmentByteCount) }

    /// Bytes that can still be written without touching anything referenced: the open
    /// segment's remainder, every free segment's payload, and the usable part of the holes.
    var appendableByteCount: UInt64 { segmentRoomByteCount + usableHoleByteCount }

    /// The open segment's remainder plus every free segment's payload.
    var segmentRoomByteCount: UInt64 { space.roomByteCount }

    /// Hole bytes counted only in whole units of the largest extent an append needs (a
    /// block or a page), so fragmentation cannot make the figure a promise it can't keep.
    var usableHoleByteCount: UInt64 {
        let unit = UInt64(max(blockByteCount, PoolGeometry.pageByteCount))
        return holes.reduce(0) { $0 + usableByteCount(of: $1, unit: unit) }
    }

    /// Whole `unit`s that fit in `hole` after aligning its start to a page (an
    /// uncompressed block or a page cannot use the unaligned head).
    func usableByteCount(of hole: (byteOffset: UInt64, byteCount: UInt64), unit: UInt64) -> UInt64 {
        let page = UInt64(PoolGeometry.pageByteCount)
        let start = (hole.byteOffset + page - 1) & ~(page - 1)
        let end = hole.byteOffset + hole.byteCount
        return end > start ? (end - start) / unit * unit : 0
    }

    /// Bytes the next checkpoint needs: every dirty page plus the root.
    /// ``plannedRoot()``'s encoded length before padding, without building it.
    var plannedRootUnpaddedByteCount: Int {
        CheckpointRoot.unpaddedByteCount(volumeRowByteTotal: volumeRowByteTotal, segmentCount: segmentStates.count,
                                         queueCount: releaseQueue.count)
    }

    /// ``plannedRoot()``'s encoded length, without building it.
    var plannedRootByteCount: Int { Int(sectorAligned(UInt64(plannedRootUnpaddedByteCount))) }

    var checkpointNeedByteCount: UInt64 {
        UInt64(checkpointPageBound) * UInt64(PoolGeometry.pageByteCount) + UInt64(plannedRootByteCount)
            + UInt64(PoolGeometry.pageByteCount)  // rounding slack when a page does not fit a segment's tail
    }

    func now() -> Int64 { Int64(Date().timeIntervalSince1970) }
}

/// What open found and did.
/// Why journal replay stopped (Specs/FORMAT.md J-4).
public enum ReplayStopKind: String, Sendable, Equatable, CaseIterable {
    /// Zeros where the next record would start: nothing was written there.
    case cleanEnd = "clean-end"
    /// Non-zero bytes that are not a record header (a torn or garbled header).
    case tornHeader = "torn-header"
    /// A valid header of another epoch (a record of an earlier lap).
    case staleLap = "stale-lap"
    /// A valid header of this epoch with the wrong sequence.
    case sequenceGap = "sequence-gap"
    /// A header whose record would run past the end of the ring.
    case pastRingEnd = "past-ring-end"
    /// A header whose record fails its checksum (torn payload).
    case badRecordChecksum = "bad-record-checksum"
    /// A whole record whose data fails its checksum (its data was torn).
    case badDataChecksum = "bad-data-checksum"
    /// Every byte of the ring was consumed.
    case endOfRing = "end-of-ring"
    /// The next record (or the data it names) could not be read (an I/O error).
    case unreadable = "unreadable"
}

public struct RecoveryReport: Sendable, Equatable {
    /// The superblock slot chosen (0 = A, 1 = B) and its generation.
    public var chosenSlot = 0
    public var generation: UInt64 = 0
    /// Why the other slot was not chosen, when that is worth reporting.
    public var otherSlotProblem: String? = nil
    /// Journal records applied.
    public var replayedRecordCount = 0
    /// Why replay stopped (end of log, torn record, data checksum, ...).
    public var replayStopReason = ""
    /// Ring offset where replay stopped and the sequence it expected there.
    public var replayStopRingOffset = 0
    public var replayStopSequence: UInt64 = 0
    /// True when a record of the expected epoch and sequence was there but was torn or
    /// its data failed its checksum (a torn tail), false at a plain end of the journal.
    public var replayStopWasTorn = false
    /// Why replay stopped, as a kind (coverage marks of the crash simulator).
    public var replayStopKind: ReplayStopKind = .cleanEnd
    /// `relocate` (compaction move) records replayed; and whether replay stopped at one
    /// whose copies did not verify (the move is discarded, the blocks stay put).
    public var replayedRelocateCount = 0
    public var discardedRelocate = false
    /// Replay stopped inside synced space (FORMAT J-7): a read-only open, or a
    /// read-write one that accepted the loss, replayed only up to the damage.
    public var syncedJournalDamage = false
    /// When ``syncedJournalDamage``: which synced records were lost, for the operator.
    public var syncedJournalLoss: String? = nil
    /// Segment headers a read-write open rewrote (lost or garbled by the crash).
    public var rewrittenSegmentHeaders = 0
    /// Problems found comparing stored with rebuilt figures; each was repaired in memory.
    public var findings: [String] = []
    /// The recovery checkpoint did not fit the free segments and the open segment's
    /// tail, so open rebuilt usage and holes from the block table's leaves in a second
    /// pass (a pool that crashed nearly full; COMMIT §4 step 6). Not a problem.
    public var rebuiltUsageForRoom = false
    /// The stored refcounts were unusable or (with a rebuild asked for) wrong, so open
    /// rebuilt them from the maps and the next checkpoint writes them again (a finding
    /// says which).
    public var rebuiltRefcounts = false
    /// True when the pool was not cleanly closed.
    public var wasMounted = false
}

/// Why the engine refuses every call, if it does: set by a failed device call, by a
/// journaled change that could not be applied, or by a reader that found metadata
/// breaking P-4. The cause sits in a mutex; a flag beside it makes the check on every
/// read one atomic load.
final class PoisonState: Sendable {
    private let stored = Mutex<String?>(nil)
    private let isSet = Atomic<Bool>(false)

    var cause: String? {
        get { isSet.load(ordering: .acquiring) ? stored.withLock { $0 } : nil }
        set {
            stored.withLock { $0 = newValue }
            isSet.store(newValue != nil, ordering: .releasing)
        }
    }

    /// Sets the cause unless one is set already (the first failure is the one reported).
    func setIfClear(_ newCause: String) {
        stored.withLock { if $0 == nil { $0 = newCause } }
        isSet.store(true, ordering: .releasing)
    }
}
