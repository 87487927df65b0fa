import Foundation
import LogPoolFormat

/// Pool-wide figures. `used + dead + unwritten + reserve + overhead == capacity`.
public struct PoolStats: Sendable, Equatable, Codable {
    /// Size of the pool file.
    public var capacityBytes: UInt64
    /// Live bytes: data blocks plus the durable checkpoint's metadata.
    public var usedBytes: UInt64
    /// Written bytes no longer referenced, reclaimed by checkpoint and compaction.
    public var deadBytes: UInt64
    /// The part of ``deadBytes`` the next checkpoint gives back on its own: segments with
    /// nothing live left in them. The rest needs compaction (live data moved out first).
    public var deadAtCheckpointBytes: UInt64 = 0
    /// Bytes new data can still take: the payload less live data, metadata, the reserve
    /// and the overwrite headroom (admission rule A-1). Dead space counts as available,
    /// because a write that needs it checkpoints and compacts on its own; so this reads
    /// 0 only when live data really fills the pool.
    public var freeBytes: UInt64
    /// Unwritten bytes (free segments and the open segment's rest) less the reserve:
    /// what writes take before anything has to be reclaimed.
    public var unwrittenBytes: UInt64 = 0
    /// Segments held back so a checkpoint and a compaction can always run.
    public var reserveBytes: UInt64
    /// Superblocks, journal ring, segment headers and the unused file tail.
    public var overheadBytes: UInt64
    public var volumeCount: Int
    public var snapshotCount: Int
    public var blockSize: Int
    public var segmentSize: Int
    public var segmentCount: Int
    public var freeSegmentCount: Int
    public var journalBytes: UInt64
    /// Journal bytes written since the last checkpoint: what a crash now would replay. A
    /// checkpoint starts on its own when they, together with the previous epoch's bytes
    /// (kept in the ring for a fallback to the older superblock slot), pass three
    /// quarters of ``journalBytes``.
    public var journalUsedBytes: UInt64 = 0
    /// Journal records written since the last checkpoint: the replay a crash now leaves
    /// to the next open. A checkpoint also starts on its own when they reach
    /// ``journalRecordBound``, so that replay stays bounded whatever the ring's size.
    public var journalRecords: Int = 0
    /// The record count at which a checkpoint starts on its own (65,536).
    public var journalRecordBound: Int = 0
    /// Map and block-table leaves changed since the last checkpoint, and refcount leaves
    /// whose counts changed: pinned in memory until it writes them. A checkpoint also
    /// starts on its own when they pass ``dirtyLeafBound`` (half the metadata cache's
    /// pages, at least 4), so memory stays bounded under any write load.
    public var dirtyLeaves: Int = 0
    /// Deleted volumes and snapshots whose blocks are still being released (the release
    /// queue): their space comes back in bounded steps between writes, at once when a
    /// write needs it, and in full on ``Pool/compact()``. It counts as used until then.
    public var deletedMapsReleasing: Int = 0
    /// The dirty leaf count past which a checkpoint starts on its own.
    public var dirtyLeafBound: Int = 0
    public var compression: String
    /// False when the pool was open for writing and not closed (it was recovered).
    public var cleanlyClosed: Bool
    public var generation: UInt64
    /// Largest single write that is atomic across a crash.
    public var atomicWriteBytes: Int
    /// Since the pool was opened: data bytes appended for callers' writes, as stored
    /// (sector-aligned, compressed where LZ4 shrank the block). With ``movedDataBytes``
    /// this gives the write amplification compaction adds.
    public var writtenDataBytes: UInt64 = 0
    /// Since the pool was opened: data bytes compaction copied forward.
    public var movedDataBytes: UInt64 = 0
}

/// One row of ``Pool/list()``.
public struct VolumeInfo: Sendable, Equatable, Codable {
    public var name: String
    /// "volume" (writable, including clones) or "snapshot" (read-only).
    public var kind: String
    public var sizeBytes: UInt64
    /// Logical bytes mapped (blocks written and not discarded) times the block size.
    public var mappedBytes: UInt64
    /// On-disk bytes of every block the volume references, shared ones included.
    public var allocatedBytes: UInt64
    /// On-disk bytes that only this volume references: what deleting it gives back.
    public var exclusiveBytes: UInt64
    /// The volume or snapshot it was created from, if that still exists.
    public var origin: String?
    /// Unix seconds.
    public var createdTime: Int64
}

/// A pool: one file holding thin volumes, snapshots and clones, crash-safe by a journal
/// and an A/B superblock (see Specs/COMMIT.md).
///
/// Thread safety: every method takes the pool's lock, so a `Pool` and its ``Volume``s may
/// be used from many threads at once. Methods throw ``PoolError`` only.
public final class Pool: @unchecked Sendable {
    /// Largest volume size accepted (2^50 bytes = 1 PiB).
    public static let volumeSizeMax: UInt64 = PoolGeometry.volumeByteCountMax
    /// Longest volume name in UTF-8 bytes.
    public static let nameByteCountMax = 255

    /// The pool's lock: exclusive for changes, shared for planning reads. A condition
    /// too: ``sync()`` callers wait on it for an fsync in flight, and ``close()`` for one
    /// to finish.
    let lock = PoolLock()
    let engine: Engine
    private let fileDevice: FileDevice?
    public let path: String?

    init(engine: Engine, fileDevice: FileDevice?, path: String?) {
        self.engine = engine
        self.fileDevice = fileDevice
        self.path = path
        if fileDevice != nil { engine.enableWriteBehind() }
    }

    deinit {
        if !engine.isClosed && !engine.readOnly && engine.poisonCause == nil {
            // A pool dropped without close() keeps its journal; the next open recovers.
            try? engine.sync()
        }
    }

    // MARK: - Create and open

    /// Creates a new pool file at `path` of `capacity` bytes and opens it read-write.
    ///
    /// - Parameters:
    ///   - blockSize: unit of addressing and copy-on-write, a power of two 512...65536.
    ///   - segmentSize: unit of allocation and compaction; nil picks 1/64 of the pool,
    ///     64 KiB to 4 MiB.
    ///   - metadataCacheBytes: the block-table page budget, as for ``open(at:mode:acceptJournalLoss:metadataCacheBytes:)``.
    /// - Throws: ``PoolError/exists(_:)`` when the file exists, ``PoolError/invalidArgument(_:)``
    ///   for an unusable geometry.
    public static func create(at path: String, capacity: UInt64, blockSize: Int = 4096,
                              segmentSize: Int? = nil, compression: CompressionMode = .lz4,
                              metadataCacheBytes: Int = Pool.defaultMetadataCacheBytes) throws -> Pool {
        let geometry = try makeGeometry(capacity: capacity, blockSize: blockSize, segmentSize: segmentSize)
        let device = try FileDevice(path: path, mode: .readWrite, create: true)
        do {
            try device.truncate(toByteCount: capacity)
            let engine = try Engine.format(device: device, geometry: geometry, compression: compression,
                                           uuid: newUUID(), createdTime: Int64(Date().timeIntervalSince1970),
                                           metadataCacheByteCount: metadataCacheBytes)
            try FileDevice.syncParentDirectory(of: path)
            return Pool(engine: engine, fileDevice: device, path: path)
        } catch {
            device.closeDescriptor()
            unlink(path)
            throw error
        }
    }

    /// Formats a pool on any device (tests use an in-memory one). The device must be
    /// zero-filled and at least `capacity` bytes.
    public static func create(on device: BlockDevice, capacity: UInt64, blockSize: Int = 4096,
                              segmentSize: Int? = nil, compression: CompressionMode = .lz4,
                              metadataCacheBytes: Int = Pool.defaultMetadataCacheBytes) throws -> Pool {
        let geometry = try makeGeometry(capacity: capacity, blockSize: blockSize, segmentSize: segmentSize)
        let available = try device.byteCount()
        guard available >= capacity else {
            throw PoolError.invalidArgument("the device holds \(available) bytes, fewer than the capacity \(capacity)")
        }
        let engine = try Engine.format(device: device, geometry: geometry, compression: compression,
                                       uuid: newUUID(), createdTime: Int64(Date().timeIntervalSince1970),
                                       metadataCacheByteCount: metadataCacheBytes)
        return Pool(engine: engine, fileDevice: nil, path: nil)
    }

    /// Opens the pool file at `path`, recovering from a crash if needed.
    ///
    /// `.readWrite` takes an exclusive lock, `.readOnly` a shared one: a second writer gets
    /// ``PoolError/inUse(_:)``. Damage is ``PoolError/corrupt(structure:byteOffset:detail:)``.
    ///
    /// A pool whose journal is damaged inside synced space (FORMAT J-7) does not open,
    /// read-only or read-write: ``PoolError/corrupt(structure:byteOffset:detail:)`` names
    /// the journal record and the synced sequences that are lost. With
    /// `acceptJournalLoss` it opens as it was before the damage and says what is lost
    /// (`recoveryReport.syncedJournalDamage`, `syncedJournalLoss`); read-only nothing is
    /// written, read-write the recovery commits without those records, for good.
    ///
    /// Only a regular file or a block device is a pool: anything else (a FIFO, a
    /// directory) is ``PoolError/invalidArgument(_:)`` at once, without blocking.
    ///
    /// `metadataCacheBytes` bounds the block table's pages kept in memory (default
    /// ``defaultMetadataCacheBytes``): others are read from the file when needed and
    /// dropped again, least recently used first. Pages changed since the last checkpoint
    /// stay until it writes them; past half the budget a change checkpoints first.
    public static func open(at path: String, mode: OpenMode = .readWrite, acceptJournalLoss: Bool = false,
                            metadataCacheBytes: Int = Pool.defaultMetadataCacheBytes) throws -> Pool {
        let device = try FileDevice(path: path, mode: mode)
        do {
            let engine = try Engine.open(device: device, readOnly: mode == .readOnly, salvage: acceptJournalLoss,
                                         metadataCacheByteCount: metadataCacheBytes)
            return Pool(engine: engine, fileDevice: device, path: path)
        } catch {
            device.closeDescriptor()
            throw error
        }
    }

    /// Opens read-write rebuilding every derived count from the trees and comparing it with
    /// the checkpoint, whatever state the pool was left in (repair: a clean open trusts
    /// the stored usage).
    static func openRebuildingCounts(at path: String) throws -> Pool {
        let device = try FileDevice(path: path, mode: .readWrite)
        do {
            return Pool(engine: try Engine.open(device: device, readOnly: false, rebuildCounts: true), fileDevice: device, path: path)
        } catch {
            device.closeDescriptor()
            throw error
        }
    }

    /// ``openRebuildingCounts(at:)`` on any device.
    static func openRebuildingCounts(on device: BlockDevice) throws -> Pool {
        Pool(engine: try Engine.open(device: device, readOnly: false, rebuildCounts: true), fileDevice: nil, path: nil)
    }

    /// Opens a pool on any device.
    public static func open(on device: BlockDevice, mode: OpenMode = .readWrite, acceptJournalLoss: Bool = false,
                            metadataCacheBytes: Int = Pool.defaultMetadataCacheBytes) throws -> Pool {
        Pool(engine: try Engine.open(device: device, readOnly: mode == .readOnly, salvage: acceptJournalLoss,
                                     metadataCacheByteCount: metadataCacheBytes), fileDevice: nil, path: nil)
    }

    /// The metadata cache budget when none is named: 64 MiB, the block-table pages of
    /// about 2.8 million blocks (11 GiB of 4 KiB blocks).
    public static let defaultMetadataCacheBytes = Engine.defaultMetadataCacheByteCount

    /// Makes every pool this process creates or opens from now on use `bytes` as its
    /// metadata cache budget, whatever the call names (nil: each call's own again). For
    /// the CLI's `LOGPOOL_METADATA_CACHE` and the crash simulator's `--metadata-cache`;
    /// `package`, so no embedding app sees it.
    package static func overrideMetadataCacheBytes(_ bytes: Int?) {
        Engine.metadataCacheOverride.withLock { $0 = bytes }
    }

    private static func makeGeometry(capacity: UInt64, blockSize: Int, segmentSize: Int?) throws -> PoolGeometry {
        guard blockSize > 0, blockSize <= Int(UInt32.max), (segmentSize ?? 1) > 0, (segmentSize ?? 1) <= Int(UInt32.max) else {
            throw PoolError.invalidArgument("block size \(blockSize) or segment size \(segmentSize ?? 0) is out of range")
        }
        switch PoolGeometry.make(capacityByteCount: capacity, blockByteCount: UInt32(blockSize),
                                 segmentByteCount: segmentSize.map { UInt32($0) }) {
        case .success(let geometry): return geometry
        case .failure(let error): throw PoolError.invalidArgument(error.description)
        }
    }

    private static func newUUID() -> [UInt8] {
        let u = UUID().uuid
        return [u.0, u.1, u.2, u.3, u.4, u.5, u.6, u.7, u.8, u.9, u.10, u.11, u.12, u.13, u.14, u.15]
    }

    // MARK: - Lifecycle

    func locked<T>(_ body: () throws -> T) rethrows -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body()
    }

    /// `body` under the writers' mutex only (COMMIT §7.3): reads keep planning while it
    /// runs, and the engine takes the read-write lock exclusively around each change to
    /// what they plan from (``Engine/exclusively(_:)``). On a device without concurrent
    /// access (the crash simulator's) the whole lock, as before.
    func writerLocked<T>(_ body: () throws -> T) rethrows -> T {
        guard engine.device.allowsConcurrentAccess else { return try locked(body) }
        lock.lockWriter()
        engine.exclusiveLock = lock
        defer {
            engine.exclusiveLock = nil
            lock.unlockWriter()
        }
        return try body()
    }

    /// `body` under the lock shared with other such calls: it must only read the
    /// engine's state (reads' planning, COMMIT §7).
    func sharedLocked<T>(_ body: () throws -> T) rethrows -> T {
        lock.lockShared()
        defer { lock.unlockShared() }
        return try body()
    }

    /// Checkpoints (marking the pool cleanly closed) and releases the file. Later calls on
    /// this pool or its volumes throw ``PoolError/closed``. Closing twice is harmless.
    public func close() throws {
        try locked {
            guard !engine.isClosed else { return }
            // An fsync outside the lock, or reads, may still use the device.
            while engine.syncInFlight { lock.wait() }
            defer {
                engine.readers.waitUntilIdle()
                engine.isClosed = true
                engine.stopWriteBehind()
                fileDevice?.closeDescriptor()
            }
            // A pool whose durable slot is not mounted has not changed since a clean
            // open (every change commits the mounted flag first): nothing to write.
            if !engine.readOnly && engine.poisonCause == nil && engine.superblock.isMounted {
                try engine.checkpoint(mounted: false)
            }
        }
    }

    /// True when changes were made since the last completed ``sync()`` (or checkpoint):
    /// a crash now could lose them.
    public var hasUnsyncedChanges: Bool {
        locked {
            engine.deviceDirty || engine.writeBehindPending || engine.journal.hasPendingBytes
                || engine.journal.durableSequence < engine.journal.nextSequence
        }
    }

    /// Drops the handle as a crash would: syncs nothing more, checkpoints nothing, and
    /// releases the file. What was synced survives; the next open replays the journal.
    /// For the benchmark's crash rows: `package`, so no embedding app sees it.
    package func abandonForBenchmark() throws {
        locked {
            engine.isClosed = true
            engine.stopWriteBehind()
            fileDevice?.closeDescriptor()
        }
    }

    /// Makes every completed write and metadata change durable (one fsync).
    ///
    /// Group commit (Specs/COMMIT.md §7): on a file the fsync runs without the pool's
    /// lock, so reads and writes go on meanwhile (what they write joins the next sync),
    /// and a caller whose changes an fsync in flight already covers, or will once it
    /// ends, shares it.
    public func sync() throws {
        guard engine.device.allowsConcurrentAccess else { return try locked { try engine.sync() } }
        // Nothing a sync changes is what reads plan from (journal, write-behind queue,
        // append point), so it holds the writers' mutex only (§7.3) and reads go on.
        lock.lockWriter()
        engine.exclusiveLock = lock
        defer {
            engine.exclusiveLock = nil
            lock.unlockWriter()
        }
        try engine.checkUsable()
        guard !engine.readOnly else { return }
        let target = engine.journal.nextSequence
        // Every change is a journal record (the commit point of a write), so the records
        // before `target` being durable is exactly what this call promises.
        while engine.journal.durableSequence < target {
            if engine.syncInFlight {
                engine.exclusiveLock = nil
                lock.waitWriter()
                engine.exclusiveLock = lock
                try engine.checkUsable()
                continue
            }
            let ticket = try engine.beginSync()
            engine.exclusiveLock = nil
            lock.unlockWriter()
            var failure: (any Error)? = nil
            do { try engine.device.sync() } catch { failure = error }
            lock.lockWriter()
            engine.exclusiveLock = lock
            engine.finishSync(ticket, failure: failure)
            lock.broadcast()
            if let failure { throw failure }
        }
    }

    /// Writes a checkpoint now (normally automatic): shortens the journal and makes
    /// segments freed since the last one reusable.
    public func checkpoint() throws {
        try locked { try engine.checkpoint() }
    }

    /// Reclaims dead space now: see ``CompactionReport``.
    public func compact() throws -> CompactionReport {
        try locked {
            // Deleted maps first: what they free is what compaction then gathers.
            try engine.drainReleaseQueue()
            return try engine.compactAll()
        }
    }

    public var isReadOnly: Bool { engine.readOnly }

    /// What open found: chosen superblock slot, replay, repaired mismatches.
    public var recoveryReport: RecoveryReport { sharedLocked { engine.recoveryReport } }

    /// Pool-wide space and state figures. Computed under the lock shared with reads (it
    /// changes nothing), so it does not wait for other reads nor stop them.
    public var stats: PoolStats {
        // Space and journal figures change under the writers' mutex alone (a volume
        // write's admission and allocation), so this takes the whole lock.
        locked { engine.stats() }
    }

    // MARK: - Volumes

    /// Checks a new volume name: 1...255 UTF-8 bytes; not "." or ".."; no "/"; no
    /// character that does not print or would change a line: control and format
    /// characters (zero-width, bidirectional marks), line and paragraph separators,
    /// private-use and unassigned code points, and U+FFFD (the replacement character a
    /// decoder puts where bytes were not UTF-8, so two byte strings would collide).
    ///
    /// `strict: false` is the older rule (length, control characters, "/") that names in
    /// a journal written by an earlier build were checked against: replay keeps
    /// accepting them, so a pool holding such a name still opens.
    static func validate(name: String, strict: Bool = true) throws {
        let count = name.utf8.count
        guard count > 0 else { throw PoolError.invalidArgument("volume name is empty") }
        guard count <= nameByteCountMax else {
            throw PoolError.invalidArgument("volume name is \(count) bytes; the limit is \(nameByteCountMax)")
        }
        if let bad = name.unicodeScalars.first(where: { $0.properties.generalCategory == .control || $0 == "/" }) {
            throw PoolError.invalidArgument("volume name contains \(bad == "/" ? "\"/\"" : "control character U+\(String(bad.value, radix: 16, uppercase: true))")")
        }
        guard strict else { return }
        guard name != "." && name != ".." else { throw PoolError.invalidArgument("volume name \"\(name)\" is reserved") }
        let refused: Set<Unicode.GeneralCategory> = [.format, .lineSeparator, .paragraphSeparator, .privateUse, .unassigned, .surrogate]
        if let bad = name.unicodeScalars.first(where: { refused.contains($0.properties.generalCategory) || $0 == "\u{FFFD}" }) {
            let why = bad == "\u{FFFD}" ? "the replacement character (the name was not valid UTF-8)" : "a character that does not print"
            throw PoolError.invalidArgument("volume name contains U+\(String(bad.value, radix: 16, uppercase: true)), \(why)")
        }
    }

    func validate(size: UInt64) throws {
        let block = UInt64(engine.blockByteCount)
        guard size > 0, size % block == 0 else {
            throw PoolError.invalidArgument("volume size \(size) must be a positive multiple of the block size \(block)")
        }
        guard size <= Pool.volumeSizeMax else {
            throw PoolError.invalidArgument("volume size \(size) exceeds the limit \(Pool.volumeSizeMax)")
        }
    }

    private func volumeState(named name: String) throws -> VolumeState {
        guard let volume = engine.catalog.volume(named: name) else { throw PoolError.notFound(name) }
        return volume
    }

    /// Creates an empty (all zeros) volume of `size` bytes, a multiple of the block size.
    @discardableResult
    public func createVolume(name: String, size: UInt64) throws -> Volume {
        try locked {
            try engine.checkWritable()
            try Pool.validate(name: name)
            try validate(size: size)
            guard engine.catalog.volume(named: name) == nil else { throw PoolError.exists(name) }
            let intent = JournalIntent.createVolume(id: engine.nextVolumeID, name: name, sizeByteCount: size, createdTime: engine.now())
            try engine.admitMetadataChange(intent, pageCount: 0, countChanges: 0)
            try engine.journalAndApply(intent)
            return Volume(pool: self, id: engine.nextVolumeID - 1)
        }
    }

    /// Opens an existing volume or snapshot by name.
    public func openVolume(name: String) throws -> Volume {
        try locked {
            try engine.checkUsable()
            return Volume(pool: self, id: try volumeState(named: name).record.id)
        }
    }

    /// Creates an immutable snapshot of `source` (a volume or snapshot). O(1): it shares
    /// the source's map; later writes copy only the pages they touch.
    @discardableResult
    public func snapshot(source: String, name: String) throws -> Volume {
        try branch(source: source, name: name, kind: .snapshot)
    }

    /// Creates a writable clone of `source` (a volume or snapshot). O(1), like a snapshot.
    @discardableResult
    public func clone(source: String, name: String) throws -> Volume {
        try branch(source: source, name: name, kind: .volume)
    }

    private func branch(source: String, name: String, kind: VolumeKind) throws -> Volume {
        try locked {
            try engine.checkWritable()
            try Pool.validate(name: name)
            let origin = try volumeState(named: source)
            guard engine.catalog.volume(named: name) == nil else { throw PoolError.exists(name) }
            let intent = JournalIntent.branch(id: engine.nextVolumeID, sourceID: origin.record.id, kind: kind, name: name, createdTime: engine.now())
            try engine.admitMetadataChange(intent, pageCount: 0, countChanges: 0)
            try engine.journalAndApply(intent)
            return Volume(pool: self, id: engine.nextVolumeID - 1)
        }
    }

    /// Deletes a volume or snapshot. Always possible on a full pool; its exclusive space is
    /// free for reuse after the next checkpoint (which runs automatically when needed).
    public func delete(name: String) throws {
        try locked {
            try engine.checkWritable()
            let volume = try volumeState(named: name)
            let intent = JournalIntent.delete(id: volume.record.id)
            try engine.ensureJournalSpace(payloadByteCount: intent.payloadByteCount)
            // O(1): the map moves to the release queue (its row is smaller than the
            // volume's), and release steps give its blocks back later (COMMIT §6.1);
            // each step's refcount leaves are reserved by rule A-1 (``refcountPageBound``).
            try engine.ensureSpace(netByteCount: 0, extents: [], pageCount: 0, addedPageCount: 0, countChanges: 0)
            // Compaction inside that may have journaled relocations.
            try engine.keepJournalRoom(payloadByteCount: intent.payloadByteCount)
            try engine.journalAndApply(intent)
            engine.reclaimBetweenChanges()
        }
    }

    public func rename(_ name: String, to newName: String) throws {
        try locked {
            try engine.checkWritable()
            try Pool.validate(name: newName)
            let volume = try volumeState(named: name)
            guard name != newName else { return }
            guard engine.catalog.volume(named: newName) == nil else { throw PoolError.exists(newName) }
            let intent = JournalIntent.rename(id: volume.record.id, name: newName)
            try engine.admitMetadataChange(intent, pageCount: 0, countChanges: 0)
            try engine.journalAndApply(intent)
        }
    }

    /// Grows or shrinks a volume (snapshots cannot be resized). Growing adds zeros.
    /// Shrinking drops the data past the new end, so it needs `allowShrink` (as
    /// `qemu-img resize --shrink`): without it a smaller size is ``PoolError/invalidArgument(_:)``
    /// naming how many mapped bytes it would drop, and nothing changes.
    ///
    /// - Returns: the mapped bytes dropped past the new end (0 when growing).
    @discardableResult
    public func resize(_ name: String, size: UInt64, allowShrink: Bool = false) throws -> UInt64 {
        try locked {
            try engine.checkWritable()
            try validate(size: size)
            let volume = try volumeState(named: name)
            guard volume.record.kind == .volume else { throw PoolError.readOnly("\(name) is a snapshot") }
            guard size != volume.record.sizeByteCount else { return 0 }
            var dropped: UInt64 = 0
            if size < volume.record.sizeByteCount {
                let range = engine.blockCount(sizeByteCount: size)..<engine.blockCount(sizeByteCount: volume.record.sizeByteCount)
                dropped = try engine.mappedSlotCount(volume.map, in: range) * UInt64(engine.blockByteCount)
                guard allowShrink else {
                    throw PoolError.invalidArgument("shrinking \(name) from \(volume.record.sizeByteCount) to \(size) bytes drops the data past the new end (\(dropped) mapped bytes); allow it explicitly (allowShrink, CLI --shrink)")
                }
            }
            let intent = JournalIntent.resize(id: volume.record.id, sizeByteCount: size)
            let newHeight = PageLayout.height(kind: .map, coveringSlotCount: engine.blockCount(sizeByteCount: size))
            try engine.admitMetadataChange(intent, pageCount: max(0, newHeight - volume.map.height) + 2 * volume.map.height)
            if size < volume.record.sizeByteCount {
                let range = engine.blockCount(sizeByteCount: size)..<engine.blockCount(sizeByteCount: volume.record.sizeByteCount)
                try engine.withRefcountRepair { try engine.pinRefcounts(unmapping: range, in: volume.map) }
            }
            try engine.journalAndApply(intent)
            return dropped
        }
    }

    /// Every volume and snapshot, by name, with its space figures.
    public func list() throws -> [VolumeInfo] {
        // The writers' mutex, not the shared lock: exclusive figures read refcount
        // leaves, which only the writer loads (``BlockIDs``); reads go on meanwhile.
        try writerLocked {
            try engine.checkUsable()
            return try engine.withRefcountRepair { try engine.volumes.values.map { try engine.info(of: $0) } }.sorted { $0.name < $1.name }
        }
    }
}

extension Engine {
    /// Admission for a change that writes no data: room for its pages and the root.
    func admitMetadataChange(_ intent: JournalIntent, pageCount: Int, addedPageCount: Int? = nil, countChanges: Int = .max) throws {
        // The checkpoint root (volume table + usage table) must fit one segment.
        var growth = 0
        switch intent {
        case .createVolume(_, let name, _, _), .branch(_, _, _, let name, _): growth = 58 + name.utf8.count
        case .rename(let id, let name): growth = max(0, name.utf8.count - (volumes[id]?.record.name.utf8.count ?? 0))
        default: break
        }
        let limit = Int(geometry.segmentPayloadByteCount) - PoolGeometry.pageByteCount
        guard plannedRootUnpaddedByteCount + growth <= limit else {
            throw PoolError.invalidArgument("the volume table would outgrow one segment (\(limit) bytes): \(volumes.count) volumes and snapshots; use a pool with larger segments")
        }
        try releaseQueuedSpace(ifShortOf: UInt64(addedPageCount ?? pageCount) * UInt64(PoolGeometry.pageByteCount))
        try ensureJournalSpace(payloadByteCount: intent.payloadByteCount)
        try ensureSpace(netByteCount: 0, extents: [], pageCount: pageCount, addedPageCount: addedPageCount ?? pageCount, countChanges: countChanges)
        try keepJournalRoom(payloadByteCount: intent.payloadByteCount)
    }

    func info(of volume: VolumeState) throws -> VolumeInfo {
        var mapped: UInt64 = 0, allocated: UInt64 = 0, exclusive: UInt64 = 0
        var table = BlockTableCursor(self)
        func walk(_ node: TreeNode, exclusivePath: Bool) throws {
            let mine = exclusivePath && node.parentCount == 1
            if node.level > 0 {
                for child in node.children { if let child { try walk(child, exclusivePath: mine) } }
                return
            }
            for id in try leafWords(node) where id != 0 {
                let bytes = try table.location(of: id).allocatedByteCount
                mapped += 1
                allocated += bytes
                if try mine && refcount(id) == 1 { exclusive += bytes }
            }
        }
        if let root = volume.map.root { try walk(root, exclusivePath: true) }
        let origin = volume.record.originID == 0 ? nil : volumes[volume.record.originID]?.record.name
        return VolumeInfo(name: volume.record.name, kind: volume.record.kind.description,
                          sizeBytes: volume.record.sizeByteCount, mappedBytes: mapped * UInt64(blockByteCount),
                          allocatedBytes: allocated, exclusiveBytes: exclusive, origin: origin,
                          createdTime: volume.record.createdTime)
    }

    /// Live bytes (data and durable metadata) and dead bytes (written, referenced by
    /// nothing: the rest of every used segment's payload, and of the open segment up to
    /// the append point).
    func liveAndDeadByteCounts() -> (live: UInt64, dead: UInt64) {
        var used: UInt64 = 0, dead: UInt64 = 0
        let payload = geometry.segmentPayloadByteCount
        for s in 0..<segmentStates.count {
            let live = liveByteCount(s)
            used += live
            switch segmentStates[s] {
            case .free: break
            case .used: dead += payload > live ? payload - live : 0
            case .open:
                let start = geometry.segmentByteOffset(s) + UInt64(PoolGeometry.segmentHeaderByteCount)
                let filled = appendByteOffset > start ? appendByteOffset - start : 0
                dead += filled > live ? filled - live : 0
            }
        }
        return (used, dead)
    }

    func stats() -> PoolStats {
        let (used, dead) = liveAndDeadByteCounts()
        let payload = geometry.segmentPayloadByteCount
        let overhead = geometry.capacityByteCount - UInt64(geometry.segmentCount) * payload
        // Holes are dead space (written, unreferenced); unwritten space is the open
        // segment's remainder and the free segments.
        let unwritten = segmentRoomByteCount
        let reserve = min(reserveByteCount + overwriteHeadroomByteCount, unwritten)
        let capacity = geometry.capacityByteCount
        assert(used + dead + unwritten + overhead == capacity, "space figures do not add up")
        let snapshots = volumes.values.filter { $0.record.kind == .snapshot }.count
        var deadAtCheckpoint: UInt64 = 0
        for s in 0..<segmentStates.count where segmentStates[s] == .used && liveByteCount(s) == 0 {
            deadAtCheckpoint += payload
        }
        return PoolStats(capacityBytes: capacity, usedBytes: used, deadBytes: dead, deadAtCheckpointBytes: deadAtCheckpoint,
                         freeBytes: logicalRoomByteCount(newBlockCount: 0), unwrittenBytes: unwritten - reserve,
                         reserveBytes: reserve, overheadBytes: overhead, volumeCount: volumes.count - snapshots,
                         snapshotCount: snapshots, blockSize: blockByteCount, segmentSize: Int(geometry.segmentByteCount),
                         segmentCount: Int(geometry.segmentCount), freeSegmentCount: freeSegments.count,
                         journalBytes: geometry.journalByteCount, journalUsedBytes: journal.usedByteCount,
                         journalRecords: journal.recordCount, journalRecordBound: replayRecordBound,
                         dirtyLeaves: pinnedLeafCount, deletedMapsReleasing: releaseQueue.count, dirtyLeafBound: dirtyPageBound, compression: compression.description,
                         cleanlyClosed: !recoveryReport.wasMounted, generation: superblock.generation,
                         atomicWriteBytes: Engine.atomicUnitByteCount, writtenDataBytes: writtenDataByteCount,
                         movedDataBytes: compactionMovedByteCount)
    }
}
