import LogPoolFormat

/// A handle on one volume or snapshot. Safe to use from many threads; every call takes
/// the pool's lock. A handle whose volume was deleted throws ``PoolError/notFound(_:)``.
public final class Volume: @unchecked Sendable {
    public let pool: Pool
    let id: UInt64
    /// The engine's state object for this volume (no lookup per I/O); read only under the
    /// pool's lock.
    private let volumeState: VolumeState

    init(pool: Pool, id: UInt64) {
        self.pool = pool
        self.id = id
        guard let state = pool.engine.volumes[id] else { preconditionFailure("Volume handle for unknown id \(id)") }
        self.volumeState = state
    }

    /// The engine's state for this volume, checked usable and not deleted. Call under the
    /// pool's lock.
    func state() throws -> VolumeState {
        try pool.engine.checkUsable()
        guard !volumeState.isDeleted else { throw PoolError.notFound("\(volumeState.record.name) was deleted") }
        return volumeState
    }

    public var name: String { (try? pool.sharedLocked { try state().record.name }) ?? "" }

    /// Logical size in bytes.
    public var size: UInt64 { (try? pool.sharedLocked { try state().record.sizeByteCount }) ?? 0 }

    /// Snapshots are read-only, and so is every volume of a read-only pool.
    public var isReadOnly: Bool {
        (try? pool.locked { try state().record.kind == .snapshot || pool.engine.readOnly }) ?? true
    }

    private func checkRange(_ volume: VolumeState, _ offset: UInt64, _ length: Int) throws {
        let (end, overflow) = offset.addingReportingOverflow(UInt64(length))
        guard !overflow, end <= volume.record.sizeByteCount else {
            throw PoolError.outOfRange("\(length) bytes at offset \(offset) of \(volume.record.name), which is \(volume.record.sizeByteCount) bytes")
        }
    }

    /// The volume's state for a change of `length` bytes at `offset`: the pool writable,
    /// the volume not a snapshot, the range inside it. Call under the pool's lock.
    private func writableState(_ offset: UInt64, _ length: UInt64) throws -> VolumeState {
        try pool.engine.checkWritable()
        let volume = try state()
        guard volume.record.kind == .volume else { throw PoolError.readOnly("\(volume.record.name) is a snapshot") }
        guard length <= UInt64(Int.max) else { throw PoolError.outOfRange("length \(length)") }
        try checkRange(volume, offset, Int(length))
        return volume
    }

    /// Reads `buffer.count` bytes at `offset`. Unwritten ranges read as zeros. Any offset
    /// and length inside the volume. A block failing its checksum throws `corrupt`.
    ///
    /// On a file the read is planned under the pool's lock and its `pread`s, checksums and
    /// decompression run outside it (Specs/COMMIT.md §7), so reads from many threads run
    /// at once and none waits for another call's I/O or a sync's fsync.
    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        let engine = pool.engine
        // Call under the lock. A plan returned has entered the reader gate.
        func plan() throws -> ReadPlan? {
            let volume = try state()
            try checkRange(volume, offset, buffer.count)
            guard buffer.count > 0 else { return nil }
            let plan = try engine.planRead(volume, byteOffset: offset, byteCount: buffer.count)
            // Planning may have created leaves and found a page named at two places
            // (COMMIT §3.2): this read is refused like every later call.
            if let cause = engine.poisonCause { throw PoolError.poisoned(cause) }
            engine.readers.enter()
            return plan
        }
        guard engine.device.allowsConcurrentAccess else {
            // Every device call under the lock (the crash simulator's device).
            return try pool.locked {
                if engine.writeBehindPending { try engine.deviceCall {} }
                guard let planned = try plan() else { return }
                defer { engine.readers.leave() }
                try planned.execute(on: engine.device, into: buffer)
            }
        }
        // Planning only reads the engine's state, so it shares the lock with other reads;
        // payloads still queued for the device need the exclusive lock to drain first.
        let shared: ReadPlan?? = try pool.sharedLocked { engine.writeBehindPending ? .none : .some(try plan()) }
        let planned = try shared ?? pool.locked {
            try engine.deviceCall {}
            return try plan()
        }
        guard let planned else { return }
        defer { engine.readers.leave() }
        try planned.execute(on: engine.device, into: buffer)
    }

    /// Reads `length` bytes at `offset` into a new array.
    public func read(at offset: UInt64, length: Int) throws -> [UInt8] {
        guard length >= 0 else { throw PoolError.outOfRange("negative length \(length)") }
        // Check the range before allocating: a huge length is an error, not an allocation.
        try pool.sharedLocked { try checkRange(try state(), offset, length) }
        var bytes = [UInt8](repeating: 0, count: length)
        try bytes.withUnsafeMutableBytes { try read(at: offset, into: $0) }
        return bytes
    }

    /// Writes `bytes` at `offset` (copy-on-write; any offset and length inside the
    /// volume). Each 1 MiB of a call is atomic across a crash. Not durable until
    /// ``sync()``. Throws `readOnly` on a snapshot and `poolFull` before changing anything
    /// when there is no space.
    public func write(at offset: UInt64, from bytes: UnsafeRawBufferPointer) throws {
        try pool.writerLocked {
            let volume = try writableState(offset, UInt64(bytes.count))
            guard bytes.count > 0 else { return }
            try pool.engine.write(volume, byteOffset: offset, data: bytes)
            pool.engine.reclaimBetweenChanges()
        }
    }

    /// Throws `poolFull` when a write of `byteCount` bytes at `offset` could not be
    /// admitted whole, counting every block the volume does not own alone as new and
    /// uncompressed (the bound a single `write` of several atomic units is checked
    /// against). Changes nothing. For a caller that writes a large input in pieces (the
    /// CLI's `write --input FILE`) and must refuse before the first piece: the pieces
    /// are then each admitted with their real sizes, which this bound covers except when
    /// compression makes overwritten blocks grow.
    public func checkRoom(forWritingAt offset: UInt64, byteCount: UInt64) throws {
        try pool.locked {
            let volume = try writableState(offset, byteCount)
            try pool.engine.admitWholeWrite(volume, byteOffset: offset, byteCount: byteCount)
        }
    }

    public func write(at offset: UInt64, from bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try write(at: offset, from: $0) }
    }

    /// Unmaps `length` bytes at `offset`: they read as zeros and whole blocks are released.
    /// Partial blocks at either end are rewritten with zeros. Atomic.
    public func discard(at offset: UInt64, length: UInt64) throws {
        try pool.locked {
            let volume = try writableState(offset, length)
            guard length > 0 else { return }
            try pool.engine.discard(volume, byteOffset: offset, byteCount: length)
            pool.engine.reclaimBetweenChanges()
        }
    }

    /// Makes this pool's writes durable (the journal is pool-wide).
    public func sync() throws { try pool.sync() }

    /// Space figures for this volume.
    public func info() throws -> VolumeInfo {
        // The writers' mutex, as ``Pool/list()``: the exclusive figure reads refcount
        // leaves, which only the writer loads (``BlockIDs``); reads go on meanwhile.
        try pool.writerLocked { try pool.engine.withRefcountRepair { try pool.engine.info(of: try state()) } }
    }
}

extension Engine {
    /// Discard: whole blocks are unmapped, partial edge blocks rewritten with zeros, all
    /// in one journal record.
    func discard(_ volume: VolumeState, byteOffset: UInt64, byteCount: UInt64) throws {
        let bs = UInt64(blockByteCount)
        let end = byteOffset + byteCount
        let firstWhole = (byteOffset + bs - 1) / bs
        let endWhole = end / bs
        var edges: [(UInt64, [UInt8])] = []
        func zeroEdge(_ blockIndex: UInt64) throws {
            let old = try mapLookup(volume.map, blockIndex: blockIndex)
            guard old != 0 else { return }
            var block = [UInt8](repeating: 0, count: blockByteCount)
            try block.withUnsafeMutableBytes { try readBlock(old, into: $0) }
            let start = blockIndex * bs
            let lower = Int(max(start, byteOffset) - start), upper = Int(min(start + bs, end) - start)
            for i in lower..<upper { block[i] = 0 }
            edges.append((blockIndex, block))
        }
        if firstWhole > endWhole {
            try zeroEdge(byteOffset / bs)  // the whole range is inside one block
        } else {
            if byteOffset % bs != 0 { try zeroEdge(byteOffset / bs) }
            if end % bs != 0 { try zeroEdge(endWhole) }
        }
        let ranges = firstWhole < endWhole ? [firstWhole..<endWhole] : []
        if edges.isEmpty {
            let intent = JournalIntent.map(volumeID: volume.record.id, unmapRanges: ranges, mappings: [])
            let pages = unmapPageCounts(volume.map, ranges: ranges)
            try admitMetadataChange(intent, pageCount: pages.written, addedPageCount: pages.added)
            try withRefcountRepair { for range in ranges { try pinRefcounts(unmapping: range, in: volume.map) } }
            try journalAndApply(intent)
            return
        }
        try writeBlocks(volume, indexes: edges.map(\.0), contents: edges.map { .owned($0.1) }, unmapRanges: ranges)
    }
}
