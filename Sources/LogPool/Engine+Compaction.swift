import LogPoolFormat

/// What compaction did.
public struct CompactionReport: Sendable, Equatable {
    public var segmentsCompacted = 0
    public var blocksMoved = 0
    public var bytesMoved: UInt64 = 0
    public var pagesRewritten = 0
    /// Segments that became free (including ones already dead before the pass).
    public var segmentsFreed = 0
    public var bytesFreed: UInt64 = 0

    public init() {}
}

extension Engine {
    /// Live bytes (data and durable metadata) in segment `s`.
    func liveByteCount(_ s: Int) -> UInt64 { space.liveByteCount(s) }

    /// The nodes a compaction of `victims` must rewrite (block-table paths of the blocks
    /// it moves, and every node whose page is in a victim, with their ancestors; only
    /// clean nodes, dirty ones are written by the next checkpoint anyway), and how many of
    /// those nodes have their current page outside the victims: the checkpoint releases
    /// each such page, and it becomes a page-aligned hole of exactly one page, room again
    /// after the checkpoint.
    func rewritePlan(victims: Set<Int>, movedIDs: [UInt64]) -> (nodes: Set<ObjectIdentifier>, releasedOutsideVictims: Int, victimInteriorCount: Int) {
        var result = Set<ObjectIdentifier>()
        var outside = 0
        func insert(_ node: TreeNode) {
            guard result.insert(ObjectIdentifier(node)).inserted else { return }
            if let s = geometry.segmentIndex(containing: node.disk.byteOffset), !victims.contains(s) { outside += 1 }
        }
        for id in movedIDs { forEachCleanNode(onPathOf: id, insert) }
        var interior = 0
        for node in victimPageNodes(victims: victims) {
            insert(node)
            if node.level > 0 { interior += 1 }
        }
        return (result, outside, interior)
    }

    /// The order compaction appends copies in: uncompressed blocks first, then the
    /// compressed ones, each group in id order. Uncompressed blocks are page aligned;
    /// after a compressed block one may need up to a page of padding, so grouping them
    /// pads once per group instead of once per alternation, and the compressed blocks
    /// (sector aligned) pack back to back.
    static func moveOrder(_ moves: [(UInt64, BlockLocation)]) -> [(UInt64, BlockLocation)] {
        let sorted = moves.sorted { $0.0 < $1.0 }
        return sorted.filter { !$0.1.isCompressed } + sorted.filter { $0.1.isCompressed }
    }

    /// Block-table pages one compaction step may leave dirty before it checkpoints: a
    /// quarter of a segment's payload. With the victim's live bytes that is what one step
    /// needs beyond the victim (COMMIT §6), well inside the two reserve segments.
    var compactionStepPageCount: Int { max(16, Int(geometry.segmentPayloadByteCount / 4) / PoolGeometry.pageByteCount) }

    /// Calls `body` with each clean node on block `id`'s block-table path, root first.
    func forEachCleanNode(onPathOf id: UInt64, _ body: (TreeNode) -> Void) {
        var node = blockTable.root
        var remainder = id
        while let current = node {
            if !current.isDirty { body(current) }
            if current.level == 0 { break }
            let span = blockTable.span(level: current.level)
            node = current.children[Int(remainder / span)]
            remainder %= span
        }
    }

    /// A checkpoint inside a compaction batch: afterwards the holes are recomputed
    /// (released pages become room) without the victims' (copies never land there).
    func checkpointKeepingVictims(_ victims: Set<Int>) throws {
        try checkpoint()
        try rebuildHoles()
        space.dropHoles(in: victims)
    }

    /// Free segments a batch of `victimCount` victims must leave untouched while it runs:
    /// the reserve (or what is left of it) less the segments the victims give back at
    /// its end, so a batch never ends with fewer free segments than min(reserve, free)
    /// at its start.
    func reserveKeptByCompaction(victimCount: Int) -> Int {
        max(0, min(freeSegments.count, Int(geometry.reserveSegmentCount)) - victimCount)
    }

    /// True when a one-page hole is usable room (``usableHoleByteCount``): blocks are at
    /// most a page.
    var pageHolesAreRoom: Bool { blockByteCount <= PoolGeometry.pageByteCount }

    /// Usable hole bytes inside `segments`.
    func usableHoleByteCount(in segments: Set<Int>) -> UInt64 {
        let unit = UInt64(max(blockByteCount, PoolGeometry.pageByteCount))
        return holes.reduce(0) { total, hole in
            segments.contains(segment(of: hole.byteOffset)) ? total + usableByteCount(of: hole, unit: unit) : total
        }
    }

    /// The clean nodes a compaction of `victims` rewrites at its end whatever it moves:
    /// every node whose page lies in a victim, with its ancestors.
    func victimPageNodes(victims: Set<Int>) -> [TreeNode] {
        var result: [TreeNode] = []
        var memo: [ObjectIdentifier: Bool] = [:]
        func visit(_ node: TreeNode) -> Bool {
            if let known = memo[ObjectIdentifier(node)] { return known }
            var affected = false
            if case .pending(let pointers) = node.childrenSnapshot {
                // Leaves without nodes yet: created only when one of them lies in a victim.
                let hit = pointers.contains { !$0.isNone && geometry.segmentIndex(containing: $0.byteOffset).map(victims.contains) == true }
                if hit { for child in node.children { if let child, visit(child) { affected = true } } }
            } else {
                for child in node.children { if let child, visit(child) { affected = true } }
            }
            if !node.isDirty, let s = geometry.segmentIndex(containing: node.disk.byteOffset), victims.contains(s) {
                affected = true
            }
            if affected && !node.isDirty { result.append(node) }
            memo[ObjectIdentifier(node)] = affected
            return affected
        }
        if let root = blockTable.root { _ = visit(root) }
        if let root = refcountTree.root { _ = visit(root) }
        for map in allMaps { if let root = map.root { _ = visit(root) } }
        return result
    }

    /// Pages the end of a batch may still write for `victimNodes` (its
    /// ``victimPageNodes(victims:)`` at the start). Every interior node counts: a step
    /// may rewrite it and the end write it again (another child may still lie in a
    /// victim), which is why the selection prices interior victim nodes twice. A leaf
    /// counts while it is clean with its page in a victim and not in `besides` (the chunk
    /// about to run dirties those, and they are counted there); once a step has
    /// rewritten it outside the victims it needs nothing more.
    func finalPageCount(_ victimNodes: [TreeNode], victims: Set<Int>, besides: Set<ObjectIdentifier>) -> Int {
        victimNodes.reduce(0) { count, node in
            if node.level > 0 { return count + 1 }
            if node.isDirty || besides.contains(ObjectIdentifier(node)) { return count }
            if let s = geometry.segmentIndex(containing: node.disk.byteOffset), !victims.contains(s) { return count }
            return count + 1
        }
    }

    /// Marks `nodes` (clean, each once) dirty, releasing their durable pages at the next
    /// checkpoint. An evicted map or block-table leaf is read back first; dirty, it stays
    /// resident until the checkpoint writes it.
    private func markDirty(_ nodes: [TreeNode]) throws {
        for node in nodes where !node.isDirty {
            try makeResident(node)
            if node.kind == .refcounts && node.level == 0 && node.words.isEmpty {
                // Its counts move with it: read before its page is released (a damaged
                // one is rebuilt from the maps and written by the next checkpoint).
                do {
                    node.words = try readPage(node.disk, kind: .refcounts, level: 0)
                } catch let error as PoolError {
                    switch error {
                    case .io, .corrupt: try rebuildRefcountsFromMaps()
                    default: throw error
                    }
                }
            }
            if node.kind != .refcounts && node.level == 0 { dirtyLeafCount += 1 }
            pendingPageReleases.append(node.disk.byteOffset)
            node.disk = .none
            dirtyPageCount += 1
        }
    }

    /// Compacts a batch of the emptiest used segments (Specs/COMMIT.md §6): the planner
    /// (``planCompactionBatch(maxLiveFraction:)``) chooses the victims and their moves,
    /// the mover (``moveBatch(_:report:)``) carries them out. Returns false when no batch
    /// gains anything or the mover had to stop early.
    @discardableResult
    func compactOneBatch(maxLiveFraction: Double = 1.0, report: inout CompactionReport) throws -> Bool {
        if dirtyPageCount > compactionStepPageCount {
            // Start from clean pages, so a step's budget is its own.
            try checkpoint()
            try rebuildHoles()
        }
        guard let plan = try planCompactionBatch(maxLiveFraction: maxLiveFraction) else { return false }
        return try moveBatch(plan, report: &report)
    }

    /// A batch the planner chose: segments to empty, and the live blocks to copy out of
    /// them in the order the mover appends them (``moveOrder(_:)``).
    struct CompactionPlan {
        var victims: Set<Int>
        var moves: [(id: UInt64, location: BlockLocation)]
    }

    /// The planner: victims are added, emptiest first among the used segments below
    /// `maxLiveFraction` live, while one step's bytes fit the unwritten space (reserve
    /// included: this is what the reserve is for) and the allocator's dry run places the
    /// copies and pages; the batch kept is the one that frees the most beyond what it
    /// writes for good. Nil when none gains anything. Changes nothing (a damaged refcount
    /// leaf met by the pass is rebuilt from the maps first, as everywhere).
    func planCompactionBatch(maxLiveFraction: Double) throws -> CompactionPlan? {
        let payload = geometry.segmentPayloadByteCount
        let candidates = segmentStates.indices
            .filter { segmentStates[$0] == .used && Double(liveByteCount($0)) < Double(payload) * maxLiveFraction }
            .sorted { liveByteCount($0) < liveByteCount($1) }
        let room = appendableByteCount
        // Pages already dirty are written by the next checkpoint whatever happens; they
        // are in `checkpointNeedByteCount`, not in the batch's cost.
        let fixed = checkpointNeedByteCount + UInt64(blockByteCount + 2 * PoolGeometry.pageByteCount)
        let considered = Array(candidates.prefix(64))
        var blocksBySegment: [Int: [(UInt64, BlockLocation)]] = [:]
        let consideredSet = Set(considered)
        // (A damaged refcount leaf met by the pass is rebuilt from the maps, and the pass
        // runs again: nothing has moved yet.)
        try withRefcountRepair {
            blocksBySegment = [:]
            try forEachLiveBlock { id, location in
                let s = segment(of: location.byteOffset)
                if consideredSet.contains(s) { blocksBySegment[s, default: []].append((id, location)) }
            }
        }
        var victims = Set<Int>()
        var moving: [(UInt64, BlockLocation)] = []
        var rewrite = Set<ObjectIdentifier>()
        var bestGain: Int64 = 0
        var best: (Set<Int>, [(UInt64, BlockLocation)], Set<ObjectIdentifier>)? = nil
        for candidate in considered {
            let candidateBlocks = blocksBySegment[candidate] ?? []
            var trialVictims = victims
            trialVictims.insert(candidate)
            let trialMoving = moving + candidateBlocks
            let plan = rewritePlan(victims: trialVictims, movedIDs: trialMoving.map(\.0))
            let trialRewrite = plan.nodes
            // The copies are appended in this order, so they pad and cross segment ends
            // as a write of the same extents would (COMMIT §6: charging every
            // uncompressed block a page of padding made moving a 75%-live segment look
            // dearer than the segment it frees, and compaction stalled with a fifth of
            // the pool dead).
            let page = UInt64(PoolGeometry.pageByteCount)
            let data = grossByteCount(of: Engine.moveOrder(trialMoving).lazy.map { (Int($0.1.allocatedByteCount), $0.1.isCompressed) })
            // A rewritten page whose old copy lies outside the victims gives that page back
            // as a hole at the checkpoint that writes its new copy, so it needs room only
            // until the end of its step and costs nothing once the batch is done (COMMIT
            // §6). Pricing every page as lost made a segment of 80% live blocks whose ids
            // spread over 70 block-table leaves look unprofitable, and compaction stalled
            // with a ninth of the pool dead. Pages in the victims are their live bytes.
            let returned = pageHolesAreRoom ? plan.releasedOutsideVictims : 0
            let inside = trialRewrite.count - returned
            let steps = returned / compactionStepPageCount + 1
            let pagesAtOnce = inside + min(returned, compactionStepPageCount + PageLayout.heightMax)
            // Each step's checkpoint writes a root and moves the append point to the next
            // 4 KiB boundary; so does a sync the engine makes on its own inside the batch
            // (the J-7 bound, after a relocate record).
            let stepWaste = UInt64(steps) * (UInt64(plannedRootByteCount) + UInt64(PoolGeometry.durableAlignmentByteCount))
            let syncWaste = (data / maxBatchDataByteCount + 2) * UInt64(PoolGeometry.durableAlignmentByteCount) + stepWaste
            // Holes inside victims are not room: copies must land outside them.
            guard data + UInt64(pagesAtOnce) * page + fixed + syncWaste + usableHoleByteCount(in: trialVictims) <= room else { break }
            // Bytes are an estimate; the allocator's dry run is exact about where the
            // copies go (variable compressed extents strand hole tails).
            let trialExtents = extents(of: Engine.moveOrder(trialMoving).lazy.map(\.1))
            // Every page the batch rewrites is placed once, none of the released ones
            // counted back (the steps' checkpoints interleave with the copies, so where
            // released pages land is not known here, and a batch chosen too tightly
            // failed a later chunk), and interior nodes above the victims' pages twice (a
            // step may rewrite one that the end writes again). Execution's per-chunk dry
            // run never asks for more than what is left of this (COMMIT §6). Counting the
            // victims' pages twice, as this once did, refused a single 85%-live victim on
            // a 128 MiB LZ4 pool with 10 MB dead (the space property's long seed 115).
            // The batch may use the reserve only as far as its victims give it back
            // (`keepFree`): a batch that ended with fewer free segments than it started
            // with let the next one, failing half-way, take the last, and compaction
            // could never run again (found by the overwrite bench, 90% LZ4 90/10).
            guard allocationFits(trialExtents, pageCount: trialRewrite.count + plan.victimInteriorCount + PageLayout.heightMax,
                                 keepFree: reserveKeptByCompaction(victimCount: trialVictims.count),
                                 excluding: trialVictims) else { break }
            victims = trialVictims
            moving = trialMoving
            rewrite = trialRewrite
            let gain = Int64(UInt64(victims.count) * payload) - Int64(data + UInt64(inside) * page + syncWaste)
            if gain > bestGain {
                bestGain = gain
                best = (victims, moving, rewrite)
            }
        }
        guard let (chosen, chosenMoves, _) = best else { return nil }
        return CompactionPlan(victims: chosen, moves: Engine.moveOrder(chosenMoves).map { (id: $0.0, location: $0.1) })
    }

    /// The mover: copies `plan`'s blocks forward with journaled moves in steps, each
    /// ending in a checkpoint once its block-table pages reach
    /// ``compactionStepPageCount``, then marks the victims' pages (and ancestors) dirty
    /// and checkpoints, after which the victims are free. Each chunk is checked with the
    /// allocator's dry run first; when one does not fit, the batch ends there (the blocks
    /// moved so far stay moved, a valid state) and false is returned.
    func moveBatch(_ plan: CompactionPlan, report: inout CompactionReport) throws -> Bool {
        let chosen = plan.victims
        let toMove = plan.moves.map { ($0.id, $0.location) }
        // Copies must never land in a victim (it would then never empty).
        space.dropHoles(in: chosen)
        // The pages the last checkpoint writes for the victims (an upper bound: moves
        // may dirty some of them first).
        let victimNodes = victimPageNodes(victims: chosen)
        let victimPageCount = victimNodes.count
        let keepFree = reserveKeptByCompaction(victimCount: chosen.count)
        if toMove.isEmpty && !allocationFits([], pageCount: victimPageCount, keepFree: keepFree, excluding: chosen) { return false }
        var index = 0
        var chunkNodes = Set<ObjectIdentifier>()
        while index < toMove.count {
            // A chunk is at most 1024 moves, and stops where the block-table pages it
            // would dirty take the dirty pages past the step budget (COMMIT §6).
            var end = index
            chunkNodes.removeAll(keepingCapacity: true)
            while end < toMove.count && end - index < 1024 {
                forEachCleanNode(onPathOf: toMove[end].0) { chunkNodes.insert(ObjectIdentifier($0)) }
                if pageHolesAreRoom && end > index && dirtyPageCount + chunkNodes.count > compactionStepPageCount { break }
                end += 1
            }
            let chunk = toMove[index..<end]
            // Journal room first: a checkpoint between writing copies and journaling them
            // would see their segment empty and free it while the copies are about to
            // become the only ones (the relocate record is not applied yet). It also comes
            // before the dry run below, which then sees the holes it leaves.
            let payload = JournalIntent.relocate([]).payloadByteCount + chunk.count * 32
            if journal.freeByteCount < JournalWriter.worstCaseByteCount(payloadByteCount: payload) {
                try checkpointKeepingVictims(chosen)
                // That commit keeps the ring bytes of the epoch it closed; when the
                // rest is still too small, a second one (no record since) releases them.
                if journal.freeByteCount < JournalWriter.worstCaseByteCount(payloadByteCount: payload) {
                    try checkpointKeepingVictims(chosen)
                }
            }
            // The selection priced the batch in bytes; this dry run of the allocator is
            // exact for the chunk and the checkpoint after it. If it fails, the batch
            // ends here: the blocks moved so far stay moved (a valid state), the victims
            // stay used, and no progress is claimed, so admission refuses with poolFull
            // rather than allocation running dry.
            let chunkExtents = extents(of: chunk.lazy.map(\.1))
            guard allocationFits(chunkExtents, pageCount: chunkNodes.count + finalPageCount(victimNodes, victims: chosen, besides: chunkNodes)
                                     + PageLayout.heightMax,
                                 keepFree: keepFree, excluding: chosen) else {
                return false
            }
            // `apply` checks each moved id is live: its refcount leaf, read and pinned now.
            try withRefcountRepair { try pinRefcounts(chunk.lazy.map(\.0)) }
            var batch = WriteBatch()
            var moves: [BlockRelocation] = []
            for (id, location) in chunk {
                let bytes = try deviceCall { try device.read(byteCount: Int(location.allocatedByteCount), at: location.byteOffset) }
                let extentAlignment = alignment(forExtentOf: Int(location.allocatedByteCount), compressed: location.isCompressed)
                let offset = try allocateExtent(byteCount: Int(location.allocatedByteCount), alignment: extentAlignment, batch: &batch)
                batch.add(bytes, at: offset)
                var moved = location
                moved.byteOffset = offset
                moves.append(BlockRelocation(blockID: id, location: moved))
                report.bytesMoved += location.allocatedByteCount
            }
            try deviceWrite(batch)
            try journalAndApply(.relocate(moves))
            report.blocksMoved += moves.count
            compactionMovedByteCount += chunk.reduce(UInt64(0)) { $0 + $1.1.allocatedByteCount }
            index = end
            // A step ends in a checkpoint: the pages it dirtied are written, their old
            // copies are released and come back as holes, so the batch's page writes
            // need room for one step, not for every page at once.
            if pageHolesAreRoom && index < toMove.count && dirtyPageCount >= compactionStepPageCount {
                try checkpointKeepingVictims(chosen)
            }
        }
        // Recomputed after the moves: they dirtied block-table paths already.
        let pages = victimPageNodes(victims: chosen)
        try markDirty(pages)
        report.pagesRewritten += pages.count
        try checkpoint()
        // The pages this batch released are room for the next one (its gain counted them).
        try rebuildHoles()
        report.segmentsCompacted += chosen.count
        return true
    }

    /// One batch on behalf of admission (``ensureSpace``).
    func compactForSpace() throws -> Bool {
        try exclusively { try compactOneBatchForSpace() }
    }

    private func compactOneBatchForSpace() throws -> Bool {
        var report = CompactionReport()
        return try compactOneBatch(report: &report)
    }

    /// Explicit compaction (`logpool compact`): checkpoint to free dead segments, then
    /// compact batches of segments that are at most 90% live while that gains space.
    func compactAll() throws -> CompactionReport {
        try checkWritable()
        var report = CompactionReport()
        let freeBefore = segmentStates.filter { $0 == .free }.count
        // Unchanged since a clean open (the slot is not mounted): no segment is waiting
        // for a checkpoint to free it. With no segment below the batch threshold either,
        // there is nothing to do, and nothing is written (an idle `logpool compact` used
        // to commit two slots).
        let payload = Double(geometry.segmentPayloadByteCount)
        if !superblock.isMounted,
           !segmentStates.indices.contains(where: { segmentStates[$0] == .used && Double(liveByteCount($0)) < payload * 0.9 }) {
            return report
        }
        try checkpoint()
        // Empty segments the older slot still needs are freed by one more commit,
        // which, with no record since, keeps nothing.
        if fallbackSegments.contains(where: { segmentStates[$0] == .used && liveByteCount($0) == 0 }) {
            try checkpoint()
        }
        var budget = segmentStates.count
        while budget > 0 {
            budget -= 1
            guard try compactOneBatch(maxLiveFraction: 0.9, report: &report) else { break }
        }
        let freeAfter = segmentStates.filter { $0 == .free }.count
        report.segmentsFreed = max(0, freeAfter - freeBefore)
        report.bytesFreed = UInt64(report.segmentsFreed) * UInt64(geometry.segmentByteCount)
        return report
    }
}
