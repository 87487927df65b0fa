import Dispatch
import LogPoolFormat

/// A block's new content: borrowed from the caller's buffer (a whole block, written
/// without a copy) or owned (a merged partial block, or compressed bytes).
enum BlockBytes {
    case borrowed(UnsafeRawBufferPointer)
    case owned([UInt8])

    var count: Int {
        switch self {
        case .borrowed(let raw): raw.count
        case .owned(let bytes): bytes.count
        }
    }

    func withBytes<T>(_ body: (UnsafeRawBufferPointer) -> T) -> T {
        switch self {
        case .borrowed(let raw): body(raw)
        case .owned(let bytes): bytes.withUnsafeBytes(body)
        }
    }
}

/// One encoded block ready to append.
struct EncodedBlock {
    var stored: BlockBytes
    var flags: UInt32
    var checksum: UInt64
    var allocatedByteCount: Int { Int(sectorAligned(UInt64(stored.count))) }
}

/// Borrowed block contents handed to the encoding workers; they only read them, during
/// the call that owns the buffers.
struct BlockBytesList: @unchecked Sendable {
    let items: [BlockBytes]
}

/// Slots filled in parallel, each by exactly one worker, then read once all are done.
final class SharedSlots<T>: @unchecked Sendable {
    private let storage: UnsafeMutableBufferPointer<T?>

    init(count: Int) {
        storage = .allocate(capacity: count)
        storage.initialize(repeating: nil)
    }

    deinit {
        storage.deinitialize()
        storage.deallocate()
    }

    func set(_ index: Int, _ value: T) { storage[index] = value }

    func take() -> [T] { storage.map { $0! } }
}

/// Coalesces writes to adjacent offsets into single `pwrite`s.
struct WriteBatch {
    private(set) var runs: [(byteOffset: UInt64, bytes: [UInt8])] = []

    mutating func add(_ bytes: [UInt8], at byteOffset: UInt64) {
        bytes.withUnsafeBytes { add($0, paddedTo: $0.count, at: byteOffset) }
    }

    /// Appends `bytes` followed by zeros up to `paddedByteCount`, copying once.
    mutating func add(_ bytes: UnsafeRawBufferPointer, paddedTo paddedByteCount: Int, at byteOffset: UInt64) {
        let padding = paddedByteCount - bytes.count
        if let last = runs.last, last.byteOffset + UInt64(last.bytes.count) == byteOffset, last.bytes.count < 8 << 20 {
            runs[runs.count - 1].bytes.append(contentsOf: bytes)
            if padding > 0 { runs[runs.count - 1].bytes.append(contentsOf: repeatElement(0, count: padding)) }
        } else {
            var run = [UInt8]()
            run.reserveCapacity(max(paddedByteCount, 1 << 20))
            run.append(contentsOf: bytes)
            if padding > 0 { run.append(contentsOf: repeatElement(0, count: padding)) }
            runs.append((byteOffset, run))
        }
    }

    func write(to device: BlockDevice) throws {
        for run in runs { try device.write(run.bytes, at: run.byteOffset) }
    }
}

extension Engine {
    /// Largest single write that is atomic across a crash (Specs/COMMIT.md §5).
    static let atomicUnitByteCount = 1 << 20

    // MARK: - Space

    /// Reserves `byteCount` (sector multiple, at most one segment payload) in the open
    /// segment, opening the lowest free segment when the open one is too full. The caller
    /// has checked that space exists; running out here is a bug.
    ///
    /// Order: the open segment; a new segment while more than the reserve is free; a hole
    /// (first fit); finally a reserve segment (checkpoints and compaction run on those).
    ///
    /// `alignment` (a power of two, 512...4096): uncompressed blocks and pages ask for page
    /// alignment so they never straddle two page-cache pages; the skipped bytes are dead.
    ///
    /// Running out here means admission miscounted: rather than trap, the engine is
    /// poisoned (its in-memory state may be half changed) and `poolFull` is thrown; the
    /// durable state is untouched and a reopen recovers it.
    func allocateExtent(byteCount: Int, alignment: Int = PoolGeometry.sectorByteCount, batch: inout WriteBatch) throws -> UInt64 {
        precondition(byteCount % PoolGeometry.sectorByteCount == 0, "extents are whole sectors")
        guard UInt64(byteCount) <= geometry.segmentPayloadByteCount - UInt64(PoolGeometry.pageByteCount) else {
            poisonCause = "an extent of \(byteCount) bytes does not fit one segment"
            throw PoolError.invalidArgument("an extent of \(byteCount) bytes does not fit one segment")
        }
        switch space.allocate(byteCount: byteCount, alignment: alignment) {
        case .open(let start), .hole(let start):
            return start
        case .newSegment(let next, let start):
            batch.add(SegmentHeader(poolUUID: superblock.poolUUID, segmentIndex: UInt32(next), generation: superblock.generation).encode(),
                      at: geometry.segmentByteOffset(next))
            return start
        case nil:
            poisonCause = "no space left for a \(byteCount)-byte extent that admission had allowed"
            throw PoolError.poolFull(neededByteCount: UInt64(byteCount), availableByteCount: 0, figures: spaceFigures(.physical))
        }
    }

    /// ``SegmentSpace/place(byteCount:alignment:in:)``: the one placement rule, shared by
    /// allocation and admission's dry runs.
    func place(byteCount: Int, alignment: Int, in plan: inout AllocationPlan) -> Placement? {
        space.place(byteCount: byteCount, alignment: alignment, in: &plan)
    }

    /// Dry run: places `extents` (bytes, alignment) in order, then the next checkpoint's
    /// pages and root, on a copy of the allocator. True when everything fits and, before
    /// the checkpoint, at least `keepFree` free segments remain untouched.
    /// The checkpoint's part starts at the next 4 KiB boundary, and holes shrink to whole
    /// 4 KiB units (its sync moves the append point there and trims the holes). Holes inside `excluding` are left out (compaction's victims).
    func allocationFits(_ extents: some Sequence<(Int, Int)>, pageCount: Int, keepFree: Int, excluding: Set<Int> = []) -> Bool {
        if surelyFits(extents, pageCount: pageCount, keepFree: keepFree) { return true }
        var plan = space.allocator
        if !excluding.isEmpty { plan.holes.removeAll { excluding.contains(segment(of: $0.byteOffset)) } }
        for (byteCount, alignment) in extents {
            guard place(byteCount: byteCount, alignment: alignment, in: &plan) != nil, plan.freeSegments.count >= keepFree else { return false }
        }
        if let open = plan.openSegment {
            let unit = UInt64(PoolGeometry.durableAlignmentByteCount)
            let end = geometry.segmentByteOffset(open) + UInt64(geometry.segmentByteCount)
            plan.appendByteOffset = min((plan.appendByteOffset + unit - 1) & ~(unit - 1), end)
        }
        plan.holes = SegmentSpace.wholeUnits(of: plan.holes)
        guard space.placePages(pageCount + checkpointPageBound, in: &plan) else { return false }
        let root = Int(sectorAligned(UInt64(plannedRootByteCount)))
        return place(byteCount: root, alignment: PoolGeometry.sectorByteCount, in: &plan) != nil && plan.freeSegments.count >= keepFree
    }

    /// A conservative shortcut for ``allocationFits(_:pageCount:keepFree:excluding:)``:
    /// true only when the open segment's rest and the free segments beyond `keepFree`
    /// hold everything whatever the placement order, counting each extent with its
    /// worst alignment padding, every page of the next checkpoint (those already dirty
    /// too), the root, the 4 KiB step of each sync, and the largest extent lost at the
    /// end of every segment used. Then the exact dry run, which walks every dirty page
    /// one at a time (thousands between checkpoints), is not needed; when the shortcut
    /// says no, the exact dry run decides as before.
    func surelyFits(_ extents: some Sequence<(Int, Int)>, pageCount: Int, keepFree: Int) -> Bool {
        let usable = freeSegments.count - keepFree
        guard usable >= 0 else { return false }
        let page = UInt64(PoolGeometry.pageByteCount)
        let root = sectorAligned(UInt64(plannedRootByteCount))
        var need: UInt64 = 0
        var largest = max(page, root)
        for (byteCount, alignment) in extents {
            need += UInt64(byteCount + alignment)
            largest = max(largest, UInt64(byteCount))
        }
        need += UInt64(pageCount + checkpointPageBound) * page * 2 + root + 2 * page
        let room = segmentRoomByteCount - UInt64(keepFree) * geometry.segmentPayloadByteCount
        return need + UInt64(usable + 1) * largest <= room
    }

    /// (bytes, alignment) of each encoded block, in allocation order.
    func extents(of encoded: [EncodedBlock]) -> [(Int, Int)] {
        encoded.map { ($0.allocatedByteCount, alignment(forExtentOf: $0.allocatedByteCount, compressed: $0.flags & BlockLocation.flagCompressed != 0)) }
    }

    /// (bytes, alignment) of each block at `locations`, in order (compaction's copies).
    func extents(of locations: some Sequence<BlockLocation>) -> [(Int, Int)] {
        locations.map { (Int($0.allocatedByteCount), alignment(forExtentOf: Int($0.allocatedByteCount), compressed: $0.isCompressed)) }
    }

    /// Where a block extent may start: any sector when compressed (they pack back to
    /// back), else ``pageAlignment(for:)``.
    func alignment(forExtentOf byteCount: Int, compressed: Bool) -> Int {
        compressed ? PoolGeometry.sectorByteCount : pageAlignment(for: byteCount)
    }

    /// Alignment for an uncompressed extent of `byteCount`: its own size up to a page.
    func pageAlignment(for byteCount: Int) -> Int {
        var alignment = PoolGeometry.sectorByteCount
        while alignment < PoolGeometry.pageByteCount && alignment * 2 <= byteCount { alignment *= 2 }
        return alignment
    }

    /// Admission (Specs/COMMIT.md §5, rule ), before anything changes:
    ///
    /// - A-1 logical: live bytes after the change, plus the next checkpoint, plus the
    ///   compaction reserve and the overwrite headroom, fit the pool. `netByteCount` is
    ///   the space the change adds for good (new blocks not replacing blocks this volume
    ///   owns alone). Failing A-1 is `poolFull`: no compaction can help.
    /// - A-2 physical: a dry run of the allocator (``allocationFits(_:pageCount:keepFree:excluding:)``)
    ///   places `extents` (every block about to be appended, in order), then the next
    ///   checkpoint's pages (those already dirty and `pageCount` more) and root, and
    ///   leaves the reserve's free segments untouched. When it does not, a checkpoint
    ///   (freeing dead segments) and then the compactor run until it does. A-1 guarantees that enough dead space exists for an
    ///   atomic unit of overwrite, so A-2 only fails when that space is too fragmented to
    ///   gather, and then also as `poolFull`.
    ///
    /// `countChanges`: how many refcounts the change can alter (its refcount leaves are
    /// priced in A-2; A-1 keeps a standing reservation for the whole refcount tree).
    func ensureSpace(netByteCount: UInt64, extents: [(Int, Int)], pageCount: Int, addedPageCount: Int,
                     newBlockCount: Int = 0, countChanges: Int = .max) throws {
        let page = UInt64(PoolGeometry.pageByteCount)
        let addedPageBytes = UInt64(addedPageCount) * page
        let room = logicalRoomByteCount(newBlockCount: newBlockCount)
        guard room >= netByteCount + addedPageBytes else {
            throw PoolError.poolFull(neededByteCount: netByteCount + addedPageBytes, availableByteCount: room, figures: spaceFigures(.logical))
        }
        let reserve = Int(geometry.reserveSegmentCount)
        func physicalFits() -> Bool {
            allocationFits(extents, pageCount: pageCount + refcountPages(forCountChanges: countChanges), keepFree: reserve)
        }
        if physicalFits() { return }
        /// Commits (freeing dead segments), then finds holes: true once the write fits.
        func commitFits() throws -> Bool {
            try checkpoint()
            if physicalFits() { return true }
            try rebuildHoles()
            return physicalFits()
        }
        if hasSegmentsToFreeAtCheckpoint || holes.isEmpty || !fallbackExtents.isEmpty {
            if try commitFits() { return }
            // What the epoch just closed wrote is kept for the older slot until one more
            // commit; with no record since, that commit keeps nothing.
            if !fallbackExtents.isEmpty, try commitFits() { return }
        }
        // Every batch frees more than it writes, so this ends; the budget only bounds
        // the time a refusal can take.
        var budget = 4 * segmentStates.count
        while !physicalFits() && budget > 0 {
            budget -= 1
            guard try compactForSpace() else { break }
        }
        if physicalFits() { return }
        // Compaction's last commit kept what its epoch wrote and killed: one more
        // commit, with no record since, releases it before refusing.
        if !fallbackExtents.isEmpty, try commitFits() { return }
        // Available: the unwritten space less the reserve this write may not take. The
        // dry run can still refuse a write that fits in bytes (hole tails too short for
        // its extents); the figures then show the dead space that was left.
        let gross = extents.reduce(UInt64(0)) { $0 + UInt64($1.0) } + UInt64(pageCount) * page
        let available = appendableByteCount > reserveByteCount ? appendableByteCount - reserveByteCount : 0
        throw PoolError.poolFull(neededByteCount: gross, availableByteCount: available, figures: spaceFigures(.physical))
    }

    /// The figures a `poolFull` carries (live, dead, reserved), computed on refusal only.
    func spaceFigures(_ rule: SpaceFigures.Rule) -> SpaceFigures {
        let (live, dead) = liveAndDeadByteCounts()
        return SpaceFigures(rule: rule, liveByteCount: live, deadByteCount: dead,
                            reservedByteCount: reserveByteCount + overwriteHeadroomByteCount)
    }

    /// Bytes rule A-1 still allows: payload minus live data, metadata as the next
    /// checkpoint will leave it (released pages gone, dirty pages written once, the block
    /// table reserved for the id space after `newBlockCount` more blocks), the reserve,
    /// the overwrite headroom and slack.
    func logicalRoomByteCount(newBlockCount: Int) -> UInt64 {
        let page = UInt64(PoolGeometry.pageByteCount)
        let slack = UInt64(blockByteCount + PoolGeometry.pageByteCount)
        let meta = metaLiveTotal + UInt64(dirtyPageCount) * page - UInt64(pendingPageReleases.count) * page
            + UInt64(plannedRootByteCount)
            + UInt64(blockTableReservedPageCount(forAllocating: newBlockCount)) * page
            + UInt64(refcountPageBound) * page
        let payload = UInt64(geometry.segmentCount) * usablePayloadByteCount
        let held = dataLiveTotal + meta + reserveByteCount + overwriteHeadroomByteCount + slack
        return payload > held ? payload - held : 0
    }

    /// What one segment can hold whatever the mix of extents: its payload less the
    /// largest tail that can stay unfilled (one largest extent less a sector). That tail
    /// is dead space no compaction can reclaim (a segment of 1 MiB holds 15 blocks of
    /// 64 KiB, 983,040 bytes of its 1,048,064), so rule A-1 must not count it as room:
    /// counting it let live data fill what physical admission could never find.
    var usablePayloadByteCount: UInt64 {
        geometry.segmentPayloadByteCount - UInt64(max(blockByteCount, PoolGeometry.pageByteCount) - PoolGeometry.sectorByteCount)
    }

    /// Room kept so that one atomic unit can always overwrite blocks its volume owns
    /// alone on a pool full of live data (the old copies die only after the write).
    /// It is also what keeps compaction cheap: dead space spread over every segment is
    /// gathered only if each segment holds enough of it to pay for moving the rest, so
    /// the headroom grows with the pool (1/32 of it) rather than staying one unit.
    ///
    /// One unit is what A-2 asks for a 1 MiB overwrite at worst (``unitWorstCaseByteCount``):
    /// the old figure of exactly 1 MiB left no room for the unit's padding, segment ends
    /// and pages, so on small pools a 1 MiB overwrite of a full volume failed.
    var overwriteHeadroomByteCount: UInt64 {
        max(unitWorstCaseByteCount, geometry.capacityByteCount / 32)
    }

    /// The most A-2 can ask for one atomic unit written uncompressed: its blocks, the
    /// padding and segment-end losses of ``grossByteCount(of:)``, the map pages of a
    /// contiguous range (its leaves plus two paths), and a block-table leaf per new id
    /// up to every leaf of the id space (the sweeping allocator hands out whatever ids
    /// are free, and after random overwrites those are scattered over the whole table),
    /// plus two paths.
    var unitWorstCaseByteCount: UInt64 {
        let unit = UInt64(Self.atomicUnitByteCount)
        let sector = UInt64(PoolGeometry.sectorByteCount), page = UInt64(PoolGeometry.pageByteCount)
        let blocks = unit / UInt64(blockByteCount) + 1
        let extent = UInt64(max(blockByteCount, PoolGeometry.pageByteCount))
        let data = blocks * UInt64(blockByteCount) + (page - sector)
        let segmentEnds = data / geometry.segmentPayloadByteCount + 2
        let paths = 2 * UInt64(PageLayout.heightMax)
        let mapPages = blocks / UInt64(PageLayout.mapLeafFanout) + 2 + paths
        let idSpace = max(blockIDLimit, idSpaceLimit(forAllocating: Int(blocks)))
        let tableLeaves = (idSpace + UInt64(PageLayout.blockTableLeafFanout) - 1) / UInt64(PageLayout.blockTableLeafFanout)
        let tablePages = min(blocks, tableLeaves) + paths
        return data + segmentEnds * (extent + page - sector) + (mapPages + tablePages) * page
    }

    /// Net new bytes a write of `encoded` at `indexes` adds: the whole block where the
    /// slot is unmapped or its block is shared, only the growth where the volume owns the
    /// old block alone (compression can make new data bigger).
    func netNewByteCount(_ map: Tree, indexes: [UInt64], encoded: [EncodedBlock]) throws -> UInt64 {
        var total: UInt64 = 0
        for (i, blockIndex) in indexes.enumerated() {
            let new = UInt64(encoded[i].allocatedByteCount)
            if let old = try exclusiveBlock(map, blockIndex: blockIndex) {
                let oldBytes = try blockLocation(old).allocatedByteCount
                total += new > oldBytes ? new - oldBytes : 0
            } else {
                total += new
            }
        }
        return total
    }

    /// Blocks a write at `indexes` adds to the live count (slots not already holding a
    /// block this map owns alone).
    func netNewBlockCount(_ map: Tree, indexes: [UInt64]) throws -> Int {
        try indexes.reduce(0) { $0 + (try exclusiveBlock(map, blockIndex: $1) == nil ? 1 : 0) }
    }

    /// The block at `blockIndex` if this map alone references it (every node on the path
    /// has one parent and the block one referencing leaf).
    func exclusiveBlock(_ map: Tree, blockIndex: UInt64) throws -> UInt64? {
        guard blockIndex < map.capacity, var node = map.root, node.parentCount == 1 else { return nil }
        var remainder = blockIndex
        while node.level > 0 {
            let span = map.span(level: node.level)
            guard let child = node.children[Int(remainder / span)], child.parentCount == 1 else { return nil }
            remainder %= span
            node = child
        }
        let id = try leafWords(node)[Int(remainder)]
        return try id != 0 && refcount(id) == 1 ? id : nil
    }

    /// Recomputes ``holes``: every extent of a used segment's payload, or of the open
    /// segment's below its append point, that no block and no page of the state references. Only valid right after a checkpoint commit, when the
    /// in-memory state is exactly the durable one (nothing dirty, nothing released since),
    /// so a hole is referenced by neither the durable checkpoint nor any journal record
    /// after its replay start (reuse rule R-2, Specs/COMMIT.md §5).
    /// `liveBlocks`: the units live blocks cover, when the caller has just marked them
    /// (open does, in the pass over the table's leaves that rebuilds usage), so the leaves
    /// are not streamed a second time.
    func rebuildHoles(liveBlocks: LiveUnits? = nil) throws {
        try exclusively { try findHoles(liveBlocks: liveBlocks) }
    }

    private func findHoles(liveBlocks: LiveUnits?) throws {
        space.forgetHoles()
        guard dirtyPageCount == 0, pendingPageReleases.isEmpty, !journal.hasPendingBytes else { return }
        var holes: [(byteOffset: UInt64, byteCount: UInt64)] = []
        defer { space.setHoles(holes) }
        let unit = LiveUnits.unitByteCount
        var live: LiveUnits
        if let liveBlocks {
            live = liveBlocks
        } else {
            live = LiveUnits(geometry)
            // A leaf that cannot be read throws before any hole is listed: a partial
            // marking would offer live space as holes.
            // (A damaged refcount leaf is rebuilt from the maps and the pass runs again.)
            try withRefcountRepair {
                live = LiveUnits(geometry)
                try forEachLiveBlock { _, location in live.mark(location.byteOffset, location.allocatedByteCount) }
            }
        }
        let firstUnit = live.firstUnit
        func add(_ offset: UInt64, _ count: UInt64) {
            guard segmentStates[segment(of: offset)] != .free else { return }
            live.mark(offset, count)
        }
        var seen = Set<ObjectIdentifier>()
        func visit(_ node: TreeNode) {
            guard seen.insert(ObjectIdentifier(node)).inserted else { return }
            add(node.disk.byteOffset, UInt64(PoolGeometry.pageByteCount))
            switch node.childrenSnapshot {
            case .ready(let children):
                for child in children { if let child { visit(child) } }
            case .pending(let pointers):
                // Leaves without nodes yet (COMMIT §3.2): their pages, none created.
                for pointer in pointers where !pointer.isNone { add(pointer.byteOffset, UInt64(PoolGeometry.pageByteCount)) }
            }
        }
        if let root = blockTable.root { visit(root) }
        if let root = refcountTree.root { visit(root) }
        for map in allMaps { if let root = map.root { visit(root) } }
        if let root = checkpointExtent { add(root.byteOffset, sectorAligned(root.byteCount)) }
        // what the records of the epoch the last commit closed wrote, which the
        // older slot's replay still checks.
        for extent in fallbackExtents { add(extent.byteOffset, extent.byteCount) }
        // Holes are runs of whole 4 KiB units with no live byte, so a write into one never
        // shares a physical sector with live data.
        for s in 0..<segmentStates.count where segmentStates[s] != .free {
            let start = geometry.segmentByteOffset(s)
            // The open segment's holes end at its append point (aligned down): above it,
            // appends go on as before. Below it, dead bytes are as unreferenced as in a
            // used segment (pages a checkpoint just released, blocks overwritten since),
            // and leaving them out made the pages a compaction batch rewrote unusable
            // until the segment filled: batches cycled without gaining.
            let end = segmentStates[s] == .open ? min(appendByteOffset, start + UInt64(geometry.segmentByteCount))
                : start + UInt64(geometry.segmentByteCount)
            let from = (start + UInt64(PoolGeometry.segmentHeaderByteCount) + unit - 1) / unit - firstUnit
            let to = end / unit - firstUnit
            guard to > from else { continue }
            var runStart: UInt64? = nil
            for u in from..<to {
                let free = !live.isMarked(u)
                if free, runStart == nil { runStart = u }
                if !free, let first = runStart {
                    holes.append(((first + firstUnit) * unit, (u - first) * unit))
                    runStart = nil
                }
            }
            if let first = runStart { holes.append(((first + firstUnit) * unit, (to - first) * unit)) }
        }
    }

    /// True when a checkpoint would free at least one segment.
    var hasSegmentsToFreeAtCheckpoint: Bool {
        space.hasEmptyUsedSegment || !pendingPageReleases.isEmpty
    }

    /// Dirty map and block-table leaves, and refcount leaves whose counts changed, are
    /// the only copy of what they hold until a checkpoint writes them, so neither cache
    /// can drop them: past half the metadata budget (at least 4 leaves) the next change
    /// checkpoints first, which keeps memory bounded under any write load (COMMIT §3.1
    /// has what this costs random writes).
    var dirtyPageBound: Int { max(4, pageCache.budgetPageCount / 2) }

    /// Leaves only a checkpoint can free: dirty map and table leaves and changed
    /// refcount leaves (``dirtyPageBound``).
    var pinnedLeafCount: Int { dirtyLeafCount + ids.changedLeafCount }

    /// The most records one epoch holds before a checkpoint starts on its own: the
    /// replay work a crash can leave to the next open. Replay costs about 1-2 µs a record
    /// here (mostly the map and refcount updates of `apply`), so this keeps recovery near
    /// 100 ms whatever the ring's size; a 64 MiB ring of 4 KiB writes held about 400,000
    /// records, which took 1.7 s to replay at 16 GiB written (COMMIT §3, triggers).
    static let defaultReplayRecordBound = 65_536

    /// Makes room in the journal ring for a record, checkpointing when it is too full,
    /// when it holds ``replayRecordBound`` records of this epoch, or when too many leaves
    /// are dirty (``dirtyPageBound``).
    func ensureJournalSpace(payloadByteCount: Int) throws {
        try ensureMounted()
        let worst = JournalWriter.worstCaseByteCount(payloadByteCount: payloadByteCount)
        if journal.freeByteCount < worst || journal.usedByteCount + journal.keptByteCount > journal.ringByteCount / 4 * 3
            || journal.recordCount >= replayRecordBound || pinnedLeafCount > dirtyPageBound {
            if pinnedLeafCount > dirtyPageBound { dirtyBoundCheckpointCount += 1 }
            try checkpoint()
            // The epoch just closed stays in the ring for the older slot; when the
            // rest is too small for this record, one more commit (no record since) frees it.
            if journal.freeByteCount < worst { try checkpoint() }
        }
    }

    /// Journals `intent` (buffered; durable at the next sync) and applies it.
    func journalAndApply(_ intent: JournalIntent) throws {
        assert(superblock.isMounted, "a change was journaled before the mounted flag was committed (ensureMounted)")
        // Planning this change may have created leaves and found a page named at two
        // places (``LeafRegistry``): nothing is journaled on that state.
        if let cause = poisonCause { throw PoolError.poisoned(cause) }
        if let flushed = journal.append(intent) {
            try deviceWrite(flushed.bytes, at: PoolGeometry.journalByteOffset + flushed.ringByteOffset)
        }
        if journal.buffer.byteCount >= 1 << 20, let early = journal.takeFullSectors() {
            try deviceWrite(early.bytes, at: PoolGeometry.journalByteOffset + early.ringByteOffset)
        }
        // Leaves pinned for this change (``pinRefcounts(_:)``) may be dropped once applied.
        defer { ids.unpinAll() }
        do {
            try apply(intent)
        } catch {
            // The record is in the journal and the state may be half changed (a block-table
            // page that could not be read): nothing more may be written.
            poisonCause = poisonCause ?? "a journaled change could not be applied: \(error)"
            throw error
        }
        // Bound the batch a crash can tear (FORMAT.md J-7): damage to the newest synced
        // batch cannot be told from a torn tail (no later record proves it was synced),
        // so keep that batch small by syncing on our own.
        let written = dataExtents(of: intent)
        unsyncedDataByteCount += written.reduce(0) { $0 + $1.1 }
        noteEpochWrites(written)
        if journal.unsyncedByteCount > journal.maxBatchByteCount || unsyncedDataByteCount > maxBatchDataByteCount {
            try sync()
        }
    }

    /// Adds data extents journal records wrote to ``epochWrittenExtents``, merging one
    /// that starts where the last one ends (appends), so the list grows with the runs
    /// written, not with the records.
    func noteEpochWrites(_ extents: [(UInt64, UInt64)]) {
        for (offset, count) in extents where count > 0 {
            if let last = epochWrittenExtents.last, last.byteOffset + last.byteCount == offset {
                epochWrittenExtents[epochWrittenExtents.count - 1].byteCount += count
            } else {
                epochWrittenExtents.append((offset, count))
            }
        }
    }

    /// A commit closed an epoch: what its records wrote is kept from reuse until
    /// the next commit, and what the epoch before wrote is released; then segments with
    /// nothing live and nothing kept become free.
    func rollFallbackExtents() {
        fallbackExtents = epochWrittenExtents
        epochWrittenExtents = []
        fallbackSegments = Set(fallbackExtents.compactMap { geometry.segmentIndex(containing: $0.byteOffset) })
        space.freeEmptySegments(keeping: fallbackSegments)
    }

    /// After admission (``ensureSpace``), whose checkpoints and compaction may have closed
    /// an epoch whose ring bytes R-4 keeps: when the next record of `payloadByteCount`
    /// no longer fits beside them, one more commit releases them. The state is clean
    /// here (admission's commits leave nothing dirty and no record), so that commit
    /// writes only a slot; it forgets the holes, which are found again.
    func keepJournalRoom(payloadByteCount: Int) throws {
        guard journal.freeByteCount < JournalWriter.worstCaseByteCount(payloadByteCount: payloadByteCount) else { return }
        try checkpoint()
        try rebuildHoles()
    }

    /// The data bound of a batch (J-7): capacity/16, at most 64 MiB.
    var maxBatchDataByteCount: UInt64 { min(64 << 20, geometry.capacityByteCount / 16) }

    // MARK: - Encoding blocks

    static func encode(_ content: BlockBytes, compression: CompressionMode) -> EncodedBlock {
        content.withBytes { block in
            if compression == .lz4 {
                // Store compressed only when that saves at least one sector.
                let limit = Int(sectorAligned(UInt64(block.count))) - PoolGeometry.sectorByteCount + 1
                if let packed = BlockCompression.compress(block, limitByteCount: limit),
                   sectorAligned(UInt64(packed.count)) < sectorAligned(UInt64(block.count)) {
                    return EncodedBlock(stored: .owned(packed), flags: BlockLocation.flagCompressed, checksum: Checksum.xxh3(packed))
                }
            }
            return EncodedBlock(stored: content, flags: 0, checksum: Checksum.xxh3(block))
        }
    }

    /// Encodes many blocks, on both cores when compressing a large write.
    func encodeAll(_ blocks: [BlockBytes]) -> [EncodedBlock] {
        let mode = compression
        if mode == .lz4 && blocks.count >= 16 {
            // Each chunk writes only its own slots of the shared buffer.
            let results = SharedSlots<EncodedBlock>(count: blocks.count)
            let list = BlockBytesList(items: blocks)
            let chunks = 8
            let per = (blocks.count + chunks - 1) / chunks
            DispatchQueue.concurrentPerform(iterations: chunks) { chunk in
                let lower = chunk * per, upper = min(list.items.count, lower + per)
                guard lower < upper else { return }
                for i in lower..<upper { results.set(i, Engine.encode(list.items[i], compression: mode)) }
            }
            return results.take()
        }
        return blocks.map { Engine.encode($0, compression: mode) }
    }

    // MARK: - Writing

    /// Writes `data` at `byteOffset` of a writable volume, one atomic unit of at most
    /// 1 MiB at a time (each unit is one journal record).
    func write(_ volume: VolumeState, byteOffset: UInt64, data: UnsafeRawBufferPointer) throws {
        if data.count > Self.atomicUnitByteCount {
            // A call of several atomic units is admitted whole first, so it does not
            // half-apply and then report poolFull.
            try admitWholeWrite(volume, byteOffset: byteOffset, byteCount: UInt64(data.count))
        }
        var done = 0
        while done < data.count {
            let take = min(Self.atomicUnitByteCount, data.count - done)
            try writeUnit(volume, byteOffset: byteOffset + UInt64(done),
                          data: UnsafeRawBufferPointer(rebasing: data[done..<done + take]))
            done += take
        }
    }

    /// Rule A-1 for a whole write of `byteCount` bytes at `byteOffset` (COMMIT §5.1),
    /// changing nothing: every block not owned by this volume alone counts as new and
    /// uncompressed (an upper bound), plus every map page the write may create or copy.
    /// `write` checks this for a call of several atomic units; ``Volume/checkRoom(forWritingAt:byteCount:)``
    /// lets a caller that writes a large input in pieces refuse before the first piece.
    func admitWholeWrite(_ volume: VolumeState, byteOffset: UInt64, byteCount: UInt64) throws {
        guard byteCount > 0 else { return }
        let bs = UInt64(blockByteCount)
        let first = byteOffset / bs, last = (byteOffset + byteCount - 1) / bs
        // Deleted maps first, when the room is short (COMMIT §5.4): every block counted
        // new, and a path of pages per leaf.
        let blocks = last - first + 1
        try releaseQueuedSpace(ifShortOf: blocks * bs + (blocks / UInt64(PageLayout.mapLeafFanout) + UInt64(2 * volume.map.height))
                                   * UInt64(PoolGeometry.pageByteCount), newBlockCount: Int(blocks))
        var newBlocks = 0
        for blockIndex in first...last where try exclusiveBlock(volume.map, blockIndex: blockIndex) == nil { newBlocks += 1 }
        // One slot per leaf is enough: page counting dedupes by leaf.
        let fanout = UInt64(PageLayout.mapLeafFanout)
        let leafSlots = [first] + stride(from: (first / fanout + 1) * fanout, through: last, by: Int(fanout)).map { $0 }
        let addedPages = pageCounts(volume.map, slots: leafSlots).added
        let needed = UInt64(newBlocks) * bs + UInt64(addedPages) * UInt64(PoolGeometry.pageByteCount)
        let room = logicalRoomByteCount(newBlockCount: newBlocks)
        guard room >= needed else { throw PoolError.poolFull(neededByteCount: needed, availableByteCount: room, figures: spaceFigures(.logical)) }
    }

    private func writeUnit(_ volume: VolumeState, byteOffset: UInt64, data: UnsafeRawBufferPointer) throws {
        let bs = UInt64(blockByteCount)
        let first = byteOffset / bs
        let last = (byteOffset + UInt64(data.count) - 1) / bs
        // Build each block's new content: whole blocks straight from `data`, partial ones
        // merged over their current content (read-modify-write).
        var contents: [BlockBytes] = []
        contents.reserveCapacity(Int(last - first + 1))
        for blockIndex in first...last {
            let blockStart = blockIndex * bs
            let lower = max(blockStart, byteOffset), upper = min(blockStart + bs, byteOffset + UInt64(data.count))
            let source = UnsafeRawBufferPointer(rebasing: data[Int(lower - byteOffset)..<Int(upper - byteOffset)])
            if lower == blockStart && upper == blockStart + bs {
                contents.append(.borrowed(source))
            } else {
                var block = [UInt8](repeating: 0, count: blockByteCount)
                let old = try mapLookup(volume.map, blockIndex: blockIndex)
                if old != 0 { try block.withUnsafeMutableBytes { try readBlock(old, into: $0) } }
                block.withUnsafeMutableBytes { raw in
                    UnsafeMutableRawBufferPointer(rebasing: raw[Int(lower - blockStart)..<Int(upper - blockStart)]).copyMemory(from: source)
                }
                contents.append(.owned(block))
            }
        }
        try writeBlocks(volume, indexes: Array(first...last), contents: contents, unmapRanges: [])
    }

    /// Bytes allocation will take for extents given as (allocated bytes, compressed),
    /// appended in order (COMMIT §5.1; compaction prices its copies with it): each
    /// extent; alignment padding where an uncompressed block follows a compressed one or
    /// starts the run (a run of equal uncompressed blocks stays aligned, so only its
    /// first block can be padded; counting every block's worst padding made a 1 MiB
    /// overwrite of 4 KiB blocks ask for 1.9 MiB and fail on small pools); and, at each
    /// segment end the run may cross, one largest extent lost at the tail plus the padding
    /// of the first block in the next segment (payload starts after the 512-byte header).
    func grossByteCount(of extents: some Sequence<(Int, Bool)>) -> UInt64 {
        let sector = PoolGeometry.sectorByteCount
        var total: UInt64 = 0
        var previousUncompressed: Int? = nil
        for (allocatedByteCount, compressed) in extents {
            total += UInt64(allocatedByteCount)
            guard !compressed else {
                previousUncompressed = nil
                continue
            }
            if previousUncompressed != allocatedByteCount {
                total += UInt64(pageAlignment(for: allocatedByteCount) - sector)
            }
            previousUncompressed = allocatedByteCount
        }
        let segmentEnds = total / geometry.segmentPayloadByteCount + 1
        return total + segmentEnds * UInt64(max(blockByteCount, PoolGeometry.pageByteCount) + PoolGeometry.pageByteCount - sector)
    }

    /// Refcounts a write can change: each new block gains one and each block it replaces
    /// or unmaps loses one, and every map page it copies (shared with a snapshot or
    /// clone) adds one to each id it names.
    func countChanges(writing count: Int, unmapping ranges: [Range<UInt64>], copiedPageCount: Int) -> Int {
        let unmapped = ranges.reduce(UInt64(0)) { $0 &+ UInt64($1.count) }
        guard unmapped < UInt64(Int.max / 4) else { return .max }
        return 2 * count + Int(unmapped) + copiedPageCount * PageLayout.mapLeafFanout
    }

    /// Stores `contents[i]` as a new block at logical block `indexes[i]` and journals one
    /// record that also unmaps `unmapRanges`. Admission happens before any change.
    func writeBlocks(_ volume: VolumeState, indexes: [UInt64], contents: [BlockBytes], unmapRanges: [Range<UInt64>]) throws {
        let encoded = encodeAll(contents)
        let payload = JournalIntent.map(volumeID: 0, unmapRanges: unmapRanges, mappings: []).payloadByteCount + contents.count * 40
        // Admission reads refcount leaves (the ids allocation will take, whether an old
        // block is this map's alone) and ends by reading and pinning every one `apply`
        // changes. A damaged leaf met here, where nothing is half changed, is rebuilt
        // from the maps and admission runs again.
        try withRefcountRepair {
            // Deleted maps first, when the room is short (COMMIT §5.4), so the figures
            // below are computed after their blocks came back: every block counted new,
            // every path of pages.
            try releaseQueuedSpace(ifShortOf: UInt64(encoded.reduce(0) { $0 + $1.allocatedByteCount })
                                       + UInt64(indexes.count + 4 * volume.map.height + 4) * UInt64(PoolGeometry.pageByteCount),
                                   newBlockCount: indexes.count)
            // Unmapping dirties at most the two boundary paths of each range.
            let pages = try pagesForWrite(volume.map, indexes: indexes)
            let unmapPages = unmapPageCounts(volume.map, ranges: unmapRanges)
            // Journal room first: its checkpoint would clean pages the estimate below counts.
            try ensureJournalSpace(payloadByteCount: payload)
            try ensureSpace(netByteCount: netNewByteCount(volume.map, indexes: indexes, encoded: encoded),
                            extents: extents(of: encoded), pageCount: pages.written + unmapPages.written, addedPageCount: pages.added + unmapPages.added,
                            newBlockCount: try netNewBlockCount(volume.map, indexes: indexes),
                            countChanges: countChanges(writing: indexes.count, unmapping: unmapRanges, copiedPageCount: pages.added + unmapPages.added))
            try keepJournalRoom(payloadByteCount: payload)
            try pinRefcounts(writing: indexes, unmapping: unmapRanges, in: volume.map)
        }
        // Nothing has changed yet; from here on only an I/O error can fail, and it poisons.
        var batch = WriteBatch()
        // Whole uncompressed blocks go to disk straight from the caller's buffer, one
        // pwrite per run that is contiguous both there and in the segment.
        var directRuns: [(byteOffset: UInt64, bytes: UnsafeRawBufferPointer)] = []
        var mappings: [BlockMapping] = []
        mappings.reserveCapacity(encoded.count)
        for (i, block) in encoded.enumerated() {
            let extentAlignment = alignment(forExtentOf: block.allocatedByteCount, compressed: block.flags & BlockLocation.flagCompressed != 0)
            let offset = try allocateExtent(byteCount: block.allocatedByteCount, alignment: extentAlignment, batch: &batch)
            switch block.stored {
            case .borrowed(let raw) where raw.count == block.allocatedByteCount:
                if let last = directRuns.last, last.byteOffset + UInt64(last.bytes.count) == offset,
                   last.bytes.baseAddress! + last.bytes.count == raw.baseAddress! {
                    directRuns[directRuns.count - 1].bytes = UnsafeRawBufferPointer(start: last.bytes.baseAddress, count: last.bytes.count + raw.count)
                } else {
                    directRuns.append((offset, raw))
                }
            default:
                block.stored.withBytes { batch.add($0, paddedTo: block.allocatedByteCount, at: offset) }
            }
            let location = BlockLocation(byteOffset: offset, storedByteCount: UInt32(block.stored.count),
                                         flags: block.flags, checksum: block.checksum)
            mappings.append(BlockMapping(blockIndex: indexes[i], blockID: 0, location: location))
        }
        try deviceWritePayload(batch, direct: directRuns)
        writtenDataByteCount += encoded.reduce(UInt64(0)) { $0 + UInt64($1.allocatedByteCount) }
        // The change readers see (COMMIT §7.3): ids (the ones admission peeked: nothing
        // else changes the id space meanwhile), the record, the maps.
        try exclusively {
            reserveBlockIDs(contents.count)
            for i in mappings.indices { mappings[i].blockID = try allocateBlockID() }
            try journalAndApply(compactIntent(volumeID: volume.record.id, unmapRanges: unmapRanges, mappings: mappings))
        }
    }

    /// `mapRun` when the mappings are one run (consecutive indexes, ids and locations of
    /// whole uncompressed blocks), else `map`.
    func compactIntent(volumeID: UInt64, unmapRanges: [Range<UInt64>], mappings: [BlockMapping]) -> JournalIntent {
        if unmapRanges.isEmpty, mappings.count >= 2, let first = mappings.first {
            let stored = first.location.storedByteCount
            let isRun = mappings.enumerated().allSatisfy { i, m in
                m.location.flags == 0 && m.location.storedByteCount == stored && Int(stored) == blockByteCount
                    && m.blockIndex == first.blockIndex + UInt64(i) && m.blockID == first.blockID + UInt64(i)
                    && m.location.byteOffset == first.location.byteOffset + UInt64(i) * UInt64(stored)
            }
            if isRun {
                return .mapRun(volumeID: volumeID, firstBlockIndex: first.blockIndex, firstBlockID: first.blockID,
                               firstByteOffset: first.location.byteOffset, storedByteCount: stored,
                               checksums: mappings.map(\.location.checksum))
            }
        }
        return .map(volumeID: volumeID, unmapRanges: unmapRanges, mappings: mappings)
    }
}

/// One bit per 4 KiB unit of the data area, set where any live byte lies (hole finding):
/// capacity / 32768 bytes whatever was written (a list of every live extent, sorted per
/// segment, took 16 bytes per live block at every open).
struct LiveUnits {
    static let unitByteCount = UInt64(PoolGeometry.durableAlignmentByteCount)
    /// The data area's first unit (absolute offset / unit).
    let firstUnit: UInt64
    private var bits: [UInt64]

    init(_ geometry: PoolGeometry) {
        let unit = LiveUnits.unitByteCount
        firstUnit = geometry.dataAreaByteOffset / unit
        let count = Int((geometry.dataAreaEndByteOffset + unit - 1) / unit - firstUnit)
        bits = [UInt64](repeating: 0, count: (count + 63) / 64)
    }

    /// Marks every unit `byteCount` bytes at `byteOffset` (inside the data area) touch.
    mutating func mark(_ byteOffset: UInt64, _ byteCount: UInt64) {
        guard byteCount > 0 else { return }
        let unit = LiveUnits.unitByteCount
        for u in Int(byteOffset / unit - firstUnit)..<Int((byteOffset + byteCount + unit - 1) / unit - firstUnit) {
            bits[u >> 6] |= 1 << UInt64(u & 63)
        }
    }

    /// Whether unit `u` (relative to ``firstUnit``) holds a live byte.
    func isMarked(_ u: UInt64) -> Bool { bits[Int(u >> 6)] & (1 << (u & 63)) != 0 }
}
