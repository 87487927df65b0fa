import LogPoolFormat

extension Engine {
    // MARK: - Format

    /// Lays out a new pool on `device` (zero-filled, `geometry.capacityByteCount` long):
    /// the first checkpoint goes to segment 0, then two checkpoints commit generation 1
    /// to slot B and generation 2 to slot A, so both slots are valid and chained from
    /// the start (Specs/COMMIT.md §1).
    static func format(device: BlockDevice, geometry: PoolGeometry, compression: CompressionMode,
                       uuid: [UInt8], createdTime: Int64,
                       metadataCacheByteCount: Int = Engine.defaultMetadataCacheByteCount) throws -> Engine {
        // A provisional generation-0 superblock that is never written; its fields only seed
        // the in-memory state.
        let provisional = Superblock(
            slotIndex: 0, poolUUID: uuid, generation: 0, geometry: geometry, compression: compression,
            checkpointByteOffset: geometry.dataAreaByteOffset + UInt64(PoolGeometry.segmentHeaderByteCount),
            checkpointByteCount: 512, checkpointChecksum: 0, journalReplayByteOffset: 0, journalReplaySequence: 1,
            parentChecksum: 0, flags: 0, createdTime: createdTime)
        let engine = Engine(device: device, superblock: provisional, readOnly: false, metadataCacheByteCount: metadataCacheByteCount)
        engine.checkpointExtent = nil
        engine.space.markAllFree()
        try engine.checkpoint(mounted: false)
        try engine.checkpoint(mounted: true)
        return engine
    }

    // MARK: - Open

    /// Opens the pool on `device`: chooses a superblock slot, loads its checkpoint,
    /// replays the journal and, when writable, commits a fresh checkpoint so the pool
    /// continues from a clean, new epoch (Specs/COMMIT.md §4). Never traps on any bytes.
    ///
    /// A mounted (crashed) pool whose replay stops inside synced space (a later record
    /// proves the lost ones were synced: media damage or a misdirected write, never a
    /// crash) is `corrupt(journal record)`, read-only too, not silently truncated like a
    /// torn tail. With `salvage` it replays up to the damage and reports the loss in
    /// `recoveryReport` (`syncedJournalDamage`, `syncedJournalLoss`); read-write, the
    /// recovery checkpoint then commits without the synced records after the damage.
    ///
    /// Segment usage comes from the checkpoint root, and holes are found when admission
    /// first needs them, so open reads no block-table leaf for them (COMMIT §4 step 4):
    /// a cleanly closed pool whose newer slot is the chosen one resumes appends where the
    /// root says they stopped; a crashed one replays on top of the stored usage.
    /// `rebuildCounts` (repair, verify), a damaged or stale other slot, and a recovery
    /// checkpoint that would not fit without the holes (`streamUsage`, a second pass)
    /// rebuild usage and holes from the live leaves and compare the usage with the root.
    ///
    /// Refcount leaves are read on use, by replay too; when replay (or the pass over
    /// live blocks) meets a damaged one, open starts again with `deriveCounts`, which
    /// derives every count from the maps (FORMAT §5.4), having written nothing.
    static func open(device: BlockDevice, readOnly: Bool, salvage: Bool = false, rebuildCounts: Bool = false,
                     metadataCacheByteCount: Int = Engine.defaultMetadataCacheByteCount,
                     streamUsage: Bool = false, deriveCounts: Bool = false) throws -> Engine {
        let size = try device.byteCount()
        let slotsEnd = PoolGeometry.superblockSlotByteOffsets[1] + UInt64(PoolGeometry.superblockByteCount)
        guard size > 0 else {
            throw PoolError.corrupt(structure: "pool file", byteOffset: 0, detail: "file is empty (0 bytes): not a LogPool pool")
        }
        guard size >= slotsEnd else {
            let first = try device.read(byteCount: min(Int(size), 8), at: 0)
            if first.count < 8 || first != SuperblockLayout.magic {
                throw PoolError.corrupt(structure: "superblock", byteOffset: 0, detail: "not a LogPool pool (bad magic; file is only \(size) bytes)")
            }
            throw PoolError.corrupt(structure: "pool file", byteOffset: size,
                                    detail: "truncated: file is \(size) bytes, the superblock slots need \(slotsEnd)")
        }
        var versions: [UInt16] = []
        func slot(_ index: Int) throws -> Result<Superblock, CorruptionError> {
            let bytes = try device.read(byteCount: PoolGeometry.superblockByteCount, at: PoolGeometry.superblockSlotByteOffsets[index])
            if let version = Superblock.formatVersion(ofSlot: bytes) { versions.append(version) }
            return Result { () throws(CorruptionError) in try Superblock.decode(bytes, slotIndex: index) }
        }
        let slotA = try slot(0), slotB = try slot(1)
        let choice: SuperblockChoice
        do {
            choice = try chooseSuperblock(slotA, slotB)
        } catch {
            // No slot this build can read, but an intact one of another format: a pool of
            // an older or newer LogPool, not damage.
            if let other = PoolError.otherFormat(versions) { throw other }
            throw PoolError(error)
        }
        let sb = choice.chosen
        guard size >= sb.geometry.capacityByteCount else {
            throw PoolError.corrupt(structure: "pool file", byteOffset: size,
                                    detail: "truncated: file is \(size) bytes, the superblock describes \(sb.geometry.dataAreaEndByteOffset) (capacity \(sb.geometry.capacityByteCount))")
        }
        let engine = Engine(device: device, superblock: sb, readOnly: readOnly, metadataCacheByteCount: metadataCacheByteCount)
        engine.recoveryReport.chosenSlot = sb.slotIndex
        engine.recoveryReport.generation = sb.generation
        engine.recoveryReport.otherSlotProblem = choice.otherSlotProblem
        engine.recoveryReport.wasMounted = sb.isMounted
        engine.recoveryReport.rebuiltUsageForRoom = streamUsage
        // A clean slot that is the newer of two chained ones has nothing to replay (the
        // first change after a commit commits the mounted flag first).
        let clean = !sb.isMounted && choice.otherSlotProblem == nil && !rebuildCounts
        let streaming = rebuildCounts || choice.otherSlotProblem != nil || streamUsage
        do {
            if let liveBlocks = try engine.loadCheckpoint(streamingTable: streaming, rebuildCounts: rebuildCounts, deriveCounts: deriveCounts) {
                // The state now equals the durable checkpoint, so its dead extents are holes
                // . Replay then removes every hole a replayed record wrote into, and the
                // recovery checkpoint may use the rest: a pool that was nearly full when it
                // crashed still has room to recover.
                try engine.rebuildHoles(liveBlocks: liveBlocks)
            }
            try engine.replayJournal()
        } catch let error as PoolError where engine.refcountLeafDamaged && !rebuildCounts && !deriveCounts {
            switch error {
            case .io, .corrupt:
                return try open(device: device, readOnly: readOnly, salvage: salvage, rebuildCounts: rebuildCounts,
                                metadataCacheByteCount: metadataCacheByteCount, streamUsage: streamUsage, deriveCounts: true)
            default:
                throw error
            }
        }
        // A cleanly closed slot has nothing to replay, unless replay chained into the
        // next epoch (its slot damaged): check then too.
        if sb.isMounted || engine.superblock.generation != sb.generation, engine.recoveryReport.replayStopKind != .endOfRing,
           let lost = engine.laterSyncedRecord() {
            let report = engine.recoveryReport
            let loss = "synced journal records \(report.replayStopSequence) through at least \(lost.durable - 1) cannot be replayed: every change they hold is lost"
            let detail = "replay stops at sequence \(report.replayStopSequence) (\(report.replayStopReason)), but record \(lost.sequence) at byte offset \(lost.byteOffset) was written after records up to \(lost.durable - 1) had been synced, so this is damage, not a torn tail; \(loss)"
            guard salvage else {
                // Read-only too: serving the state before the damage as if it were the
                // pool would be stale data with no error (promise 5).
                throw PoolError.corrupt(structure: "journal record",
                                        byteOffset: PoolGeometry.journalByteOffset + UInt64(report.replayStopRingOffset),
                                        detail: detail + " (to read what precedes the damage, open with acceptJournalLoss, CLI --salvage; read-write, that commits the loss)")
            }
            engine.recoveryReport.findings.append("journal damaged inside synced space: \(detail)")
            engine.recoveryReport.syncedJournalDamage = true
            engine.recoveryReport.syncedJournalLoss = loss
        }
        // The live block count was set by loadCheckpoint and kept by replay's apply.
        engine.rebuildFreeSegmentList()
        if clean {
            engine.resumeStoredAppendPoint()
        } else {
            engine.resumeRootSegment()
        }
        // A cleanly closed pool that replay left as it was needs no commit now: the first
        // change commits the mounted flag (``ensureMounted()``), so opening and closing
        // a pool without changing it writes nothing (COMMIT §4 step 7).
        let unchanged = !sb.isMounted && engine.superblock.generation == sb.generation
            && engine.recoveryReport.replayedRecordCount == 0 && engine.replayWrittenSegments.isEmpty
            && choice.otherSlotProblem == nil && !engine.rootNeedsRewrite && engine.recoveryReport.findings.isEmpty
        if !readOnly && !unchanged {
            // Without the holes (found only by a pass over the table's leaves, while the
            // state is the durable checkpoint's: step 6), the recovery checkpoint has the
            // free segments and the open segment's tail. When that is too little (a pool
            // that crashed nearly full), open again with the pass; nothing is written yet.
            if !streaming && engine.holes.isEmpty
                && !engine.allocationFits(EmptyCollection(), pageCount: 0, keepFree: 0) {
                return try open(device: device, readOnly: readOnly, salvage: salvage, rebuildCounts: rebuildCounts,
                                metadataCacheByteCount: metadataCacheByteCount, streamUsage: true, deriveCounts: deriveCounts)
            }
            try engine.repairSegmentHeaders()
            try engine.checkpoint(mounted: true)
            if choice.otherSlotProblem != nil {
                // The other slot was damaged or stale (a misdirected or lost slot write,
                // media damage): the commit above may have landed over the stale one's
                // partner, so commit once more; then both slots are valid and chained.
                try engine.checkpoint(mounted: true)
            }
        }
        return engine
    }

    /// Appends go on in the segment that holds the durable checkpoint root, after its
    /// last live extent, when the rest of it is a hole: a clean close leaves the open
    /// segment's unwritten tail there, and starting a fresh segment at every open threw
    /// that tail away (20 one-line CLI writes left ~20 MiB dead in a 64 MiB pool). The
    /// tail is a hole (R-2: right after open's replay, no durable state references it,
    /// trimmed to whole 4 KiB units), so writing there is as safe as writing into any
    /// hole (COMMIT §5.2 R-3).
    func resumeRootSegment() {
        guard openSegment == nil, let root = checkpointExtent, !readOnly else { return }
        let s = segment(of: root.byteOffset)
        let end = geometry.segmentByteOffset(s) + UInt64(geometry.segmentByteCount)
        guard segmentStates[s] == .used,
              let h = holes.firstIndex(where: { $0.byteOffset + $0.byteCount == end && $0.byteOffset >= root.byteOffset + root.byteCount })
        else { return }
        space.resume(s, atHole: h)
    }

    /// A clean open finds no holes (it reads no leaf), so instead of
    /// ``resumeRootSegment()`` appends go on where the root says they stopped, in the
    /// segment that was open when it was written (FORMAT C-8 `resumeByteOffset`). From
    /// there to the segment's end nothing the durable state references was ever written
    /// (appends only move forward, and a segment is opened empty or at a hole that runs to
    /// its end), so writing there is as safe as R-3's resumed tail (COMMIT §5.2). Only
    /// for a clean open: after a crash, replayed records wrote past that point.
    func resumeStoredAppendPoint() {
        guard openSegment == nil, !readOnly, storedResumeByteOffset != 0,
              let s = geometry.segmentIndex(containing: storedResumeByteOffset), segmentStates[s] == .used
        else { return }
        space.resume(s, at: storedResumeByteOffset)
    }

    /// The first change after an open that committed nothing commits the mounted flag
    /// first (a new epoch, nothing else), exactly as open did before: a crash from here
    /// on is recovered as one of a mounted pool (J-7 applies), and `cleanlyClosed` is
    /// reported false. Called before every journal record (``ensureJournalSpace(payloadByteCount:)``).
    func ensureMounted() throws {
        guard !superblock.isMounted else { return }
        try checkpoint(mounted: true)
    }

    /// Segments that replayed records wrote into were opened in the crashed epoch, so
    /// their header sector may be lost or, on a 4 KiB-sector device, garbled by a torn
    /// write. Their data is protected by its own checksums; the header only identifies
    /// the segment to offline tools. Rewrite the damaged ones before the recovery
    /// checkpoint's sync makes them durable: the header has its 4 KiB page to itself,
    /// so nothing any state references shares the rewritten sector (Specs/COMMIT.md §4).
    func repairSegmentHeaders() throws {
        for s in replayWrittenSegments.sorted() {
            let offset = geometry.segmentByteOffset(s)
            let bytes = try deviceCall { try device.read(byteCount: SegmentHeaderLayout.byteCount, at: offset) }
            if let header = try? SegmentHeader.decode(bytes, byteOffset: offset),
               header.poolUUID == superblock.poolUUID, header.segmentIndex == UInt32(s) { continue }
            try deviceWrite(SegmentHeader(poolUUID: superblock.poolUUID, segmentIndex: UInt32(s), generation: superblock.generation).encode(), at: offset)
            recoveryReport.rewrittenSegmentHeaders += 1
        }
    }

    private func corrupt(_ structure: String, _ offset: UInt64, _ detail: String) -> PoolError {
        .corrupt(structure: structure, byteOffset: offset, detail: detail)
    }

    /// Loads the checkpoint root and every tree it names (block-table leaves only as
    /// stubs: they are read through the cache), rebuilds refcounts from the map leaves,
    /// and sets segment usage. With `streamingTable` the usage is rebuilt from every
    /// referenced block's entry (one pass over the table's leaves) and compared with
    /// what the checkpoint stored, and the units the live blocks cover, marked in the
    /// same pass, are returned for the holes open computes next. Without it the stored
    /// usage is taken (the root is checksummed and was written whole before its commit;
    /// verify rebuilds and compares it), unless it cannot hold the pages the trees
    /// name, and nil is returned: holes are found when admission needs them.
    func loadCheckpoint(streamingTable: Bool, rebuildCounts: Bool = false, deriveCounts: Bool = false) throws -> LiveUnits? {
        let sb = superblock
        let bytes = try device.read(byteCount: Int(sb.checkpointByteCount), at: sb.checkpointByteOffset)
        let root: CheckpointRoot
        do {
            root = try CheckpointRoot.decode(bytes, expectedChecksum: sb.checkpointChecksum, salt: salt,
                                             byteOffset: sb.checkpointByteOffset, geometry: geometry)
        } catch {
            throw PoolError(error)
        }
        storedResumeByteOffset = root.resumeByteOffset
        var cache: [UInt64: LoadedPage] = [:]
        leafRegistry = LeafRegistry(pages: [], poison: poison)
        var groups: [GroupKey: LeafGroup] = [:]
        blockTable = Tree(kind: .blockTable, root: try loadNode(root.blockTableRoot, kind: .blockTable, level: root.blockTableHeight - 1, base: 0, cache: &cache, groups: &groups), height: root.blockTableHeight)
        var loadedVolumes: [VolumeState] = []
        for record in root.volumes {
            let map = Tree(kind: .map, root: try loadNode(record.mapRoot, kind: .map, level: record.mapHeight - 1, base: 0, cache: &cache, groups: &groups), height: record.mapHeight)
            loadedVolumes.append(VolumeState(record: record, map: map))
        }
        var loadedQueue: [QueuedMap] = []
        for queued in root.releaseQueue {
            let map = Tree(kind: .map, root: try loadNode(queued.mapRoot, kind: .map, level: queued.mapHeight - 1, base: 0, cache: &cache, groups: &groups), height: queued.mapHeight)
            loadedQueue.append(QueuedMap(id: queued.id, map: map, releasedSlotCount: queued.releasedSlotCount))
        }
        do {
            catalog = try VolumeCatalog(nextID: root.nextVolumeID, volumes: loadedVolumes, queued: loadedQueue)
        } catch {
            // The root's decoder refuses the same (FORMAT C-4, C-11): a second line.
            throw corrupt("checkpoint root", sb.checkpointByteOffset, error.description)
        }
        // A map whose root is a leaf can share it with child 0 of a taller map's level-1
        // nodes (growth keeps the old root there): those nodes' leaves are created now,
        // so that leaf's parent count is whole before anything changes it.
        let leafRoots = Dictionary(cache.filter { $0.value.kind == .map && $0.value.node.level == 0 }.map { ($0.key, $0.value.node) },
                                   uniquingKeysWith: { first, _ in first })
        // (Counted first, while every group is pending; a leaf root is counted with
        // the pages open made nodes for.)
        var lazyPagesPerSegment = [UInt32](repeating: 0, count: space.count)
        var lazyTableLeafCount = 0, lazyRefcountLeafCount = 0
        func countLazyLeaves(_ kinds: (PageKind) -> Bool) throws {
            try forEachLazyLeafPage(groups.values.filter { kinds($0.kind) }, skippingRoots: leafRoots) { kind, offset in
                lazyPagesPerSegment[segment(of: offset)] += 1
                if kind == .blockTable { lazyTableLeafCount += 1 }
                if kind == .refcounts { lazyRefcountLeafCount += 1 }
            }
        }
        try countLazyLeaves { $0 != .refcounts }
        // The id-indexed arrays are sized only once the pages that justify the limit have
        // been read (C-6): a crafted root cannot make open allocate for ids no page holds.
        let tableLeafCount = cache.values.reduce(0) { $0 + ($1.kind == .blockTable && $1.node.level == 0 ? 1 : 0) }
            + lazyTableLeafCount
        let limitMax = Engine.blockIDLimitMax(blockTableLeafCount: tableLeafCount, blockByteCount: blockByteCount)
        guard root.blockIDLimit <= limitMax else {
            throw corrupt("checkpoint", sb.checkpointByteOffset, "block id limit \(root.blockIDLimit) exceeds \(limitMax), the most that a block table of \(tableLeafCount) leaf pages allows (FORMAT C-6)")
        }
        // Refcounts: the stored ones (FORMAT §5.4), read on use (ARCHITECTURE §5 step 3):
        // open reads the tree's interior pages only, and the root holds the live count
        // (C-10). A rebuild (verify, repair, or an open again after replay met a damaged
        // leaf: `deriveCounts`), or a tree that cannot be used (an interior page damaged),
        // derives every count from the map leaves; the next checkpoint writes the leaves
        // whose stored counts differ, or every one when the tree is unusable (COMMIT §4
        // step 4).
        ids = BlockIDs(limit: root.blockIDLimit, liveCount: Int(root.liveBlockCount), budgetLeafCount: refcountBudgetLeafCount)
        var storedProblem: String? = nil
        do {
            refcountTree = Tree(kind: .refcounts, root: try loadRefcountNode(root.refcountRoot, level: root.refcountHeight - 1, base: 0, cache: &cache, groups: &groups),
                                height: root.refcountHeight)
        } catch let error as PoolError {
            switch error {
            case .io, .corrupt: storedProblem = error.description
            default: throw error
            }
        }
        // Every page open read, against which leaves created from now on are checked
        // (P-4); then the leaf-root group (after the refcount pages are known, so a
        // leaf that is also one of them is found).
        leafRegistry.addPages(cache.keys)
        if !leafRoots.isEmpty, let group = groups[GroupKey(kind: .map, base: 0)] { group.createLeaves(existing: leafRoots) }
        if storedProblem == nil { try countLazyLeaves { $0 == .refcounts } }
        var metaLiveByteCounts = [UInt64](repeating: 0, count: space.count)
        var dataLiveByteCounts = [UInt64](repeating: 0, count: space.count)
        let derive = rebuildCounts || deriveCounts || storedProblem != nil
        for (offset, page) in cache {
            metaLiveByteCounts[segment(of: offset)] += UInt64(PoolGeometry.pageByteCount)
            if page.kind == .blockTable { blockTableNodeCount += 1 }
            if page.kind == .refcounts { refcountNodeCount += 1 }
        }
        for (s, pages) in lazyPagesPerSegment.enumerated() where pages > 0 {
            metaLiveByteCounts[s] += UInt64(pages) * UInt64(PoolGeometry.pageByteCount)
        }
        blockTableNodeCount += lazyTableLeafCount
        refcountNodeCount += lazyRefcountLeafCount

        // A leaf page named twice by one level-1 page (P-4, found when its leaves are
        // created) is counted twice here; a segment cannot hold more pages than fit.
        if let s = metaLiveByteCounts.firstIndex(where: { $0 > UInt64(geometry.segmentByteCount) }) {
            throw corrupt("checkpoint", sb.checkpointByteOffset, "the trees name \(metaLiveByteCounts[s] / UInt64(PoolGeometry.pageByteCount)) pages in segment \(s), more than it holds: a page is named more than once (P-4)")
        }
        if let storedProblem {
            // Pages of the unreadable tree that were reached are released at the next
            // commit; the rest were below a damaged page and are lost already.
            recoveryReport.findings.append("refcount tree unusable (\(storedProblem)): counts rebuilt from the maps")
            recoveryReport.rebuiltRefcounts = true
            for (offset, page) in cache where page.kind == .refcounts { pendingPageReleases.append(offset) }
            // (Leaves under its level-1 pages were not counted: their groups stay unread.)
            refcountTree = Tree(kind: .refcounts, root: nil, height: 1)
            refcountNodeCount = 0
            try deriveRefcounts(unusableTree: true)
        } else if derive {
            // Only leaves that differ (or cannot be read) are written again.
            let storedLive = ids.liveCount
            let differing = try deriveRefcounts(unusableTree: false)
            if deriveCounts {
                recoveryReport.findings.append("a refcount leaf that replay needed is damaged: counts rebuilt from the maps")
                recoveryReport.rebuiltRefcounts = true
            }
            if differing > 0 {
                recoveryReport.findings.append("\(differing) refcount leaves stored counts that differ from the maps or cannot be read: rebuilt")
                recoveryReport.rebuiltRefcounts = true
            }
            if storedLive != ids.liveCount {
                recoveryReport.findings.append("the checkpoint stored \(storedLive) live block ids, the maps name \(ids.liveCount): rebuilt")
                recoveryReport.rebuiltRefcounts = true
                rootNeedsRewrite = true
            }
        }
        metaLiveByteCounts[segment(of: sb.checkpointByteOffset)] += sectorAligned(sb.checkpointByteCount)
        checkpointExtent = (sb.checkpointByteOffset, sb.checkpointByteCount)
        // Stored usage counts pages of the refcount tree that could not be reached.
        if !streamingTable && storedProblem == nil {
            if zip(root.segmentLiveByteCounts, metaLiveByteCounts).allSatisfy({ $0 >= $1 && $0 <= UInt64(geometry.segmentByteCount) }) {
                space.load(dataLive: zip(root.segmentLiveByteCounts, metaLiveByteCounts).map { $0 - $1 }, metaLive: metaLiveByteCounts)
                return nil
            }
            recoveryReport.findings.append("checkpoint usage cannot hold the pages its trees name: rebuilt from the block table")
        }
        // (Two ids at one location is a check for `verify`; open only needs each
        // referenced entry to be in range, which the pass itself checks.) One pass over
        // the leaves that hold a referenced id.
        var present = 0
        var liveBlocks = LiveUnits(geometry)
        try forEachLiveBlock { _, location in
            present += 1
            dataLiveByteCounts[segment(of: location.byteOffset)] += location.allocatedByteCount
            liveBlocks.mark(location.byteOffset, location.allocatedByteCount)
        }
        let referenced = ids.liveCount
        guard present == referenced else {
            throw corrupt("block table", sb.checkpointByteOffset, "\(referenced - present) referenced block ids have no block-table page")
        }
        for s in 0..<space.count {
            let rebuilt = dataLiveByteCounts[s] + metaLiveByteCounts[s]
            if rebuilt != root.segmentLiveByteCounts[s] {
                recoveryReport.findings.append("segment \(s): checkpoint stored \(root.segmentLiveByteCounts[s]) live bytes, rebuilt \(rebuilt)")
                rootNeedsRewrite = true
            }
        }
        space.load(dataLive: dataLiveByteCounts, metaLive: metaLiveByteCounts)
        return liveBlocks
    }

    /// Loads the refcount tree under `pointer`: interior nodes resident, each leaf's
    /// counts into `counts` (its node keeps no words), each page once, none shared with
    /// another tree (`cache`). `keepWords` also receives each leaf's words by leaf index.
    private func loadRefcountNode(_ pointer: PagePointer, level: Int, base: UInt64, cache: inout [UInt64: LoadedPage],
                                  groups: inout [GroupKey: LeafGroup]) throws -> TreeNode? {
        guard !pointer.isNone else { return nil }
        guard cache[pointer.byteOffset] == nil else {
            throw corrupt("refcount page", pointer.byteOffset, "page is referenced twice (refcount pages are never shared)")
        }
        let node: TreeNode
        if level == 0 {
            // Read on use (``readStoredRefcountLeaf(_:)``), where P-1 and C-9 are checked.
            guard geometry.isValidExtent(byteOffset: pointer.byteOffset, byteCount: UInt64(PoolGeometry.pageByteCount)) else {
                throw corrupt("refcount page", pointer.byteOffset, "page pointer is outside every segment")
            }
            node = TreeNode(kind: .refcounts, level: 0, words: [], children: [], disk: pointer)
        } else {
            let words = try readPage(pointer, kind: .refcounts, level: level)
            if level == 1 {
                let node = try lazyLevelOne(.refcounts, words, pointer, base: base, groups: &groups)
                cache[pointer.byteOffset] = LoadedPage(kind: .refcounts, node: node, base: base)
                return node
            }
            var children: [TreeNode?] = []
            children.reserveCapacity(PageLayout.interiorFanout)
            for i in 0..<PageLayout.interiorFanout {
                children.append(try loadRefcountNode(PagePointer(byteOffset: words[2 * i], checksum: words[2 * i + 1]), level: level - 1,
                                                     base: PageLayout.childBase(base, index: i, kind: .refcounts, level: level),
                                                     cache: &cache, groups: &groups))
            }
            node = TreeNode(kind: .refcounts, level: level, words: [], children: children, disk: pointer)
        }
        cache[pointer.byteOffset] = LoadedPage(kind: .refcounts, node: node, base: base)
        return node
    }

    /// Where a group of level-1 nodes sits (``LeafGroup``).
    struct GroupKey: Hashable {
        var kind: PageKind
        var base: UInt64
    }

    /// Calls `body` with each leaf page of `groups` whose node is not created yet, each
    /// page once (members of a group share a leaf only at the same slot, P-4): open
    /// counts them as it counts the pages it made nodes for. A page in `roots` (leaf
    /// roots, which can only be child 0 of map groups at block index 0) is counted with
    /// those. Members naming one page with two checksums are corrupt.
    private func forEachLazyLeafPage(_ groups: [LeafGroup], skippingRoots roots: [UInt64: TreeNode],
                                     _ body: (PageKind, UInt64) -> Void) throws {
        var seen = PagesAtSlot<UInt64>()
        for group in groups {
            let pointers = group.pendingPointers
            let rootsHere = !roots.isEmpty && group.kind == .map && group.base == 0
            guard pointers.count > 1 || rootsHere else {
                for pointer in pointers.joined() where !pointer.isNone { body(group.kind, pointer.byteOffset) }
                continue
            }
            for i in 0..<PageLayout.interiorFanout {
                seen.removeAll()
                for pointer in pointers.lazy.map({ $0[i] }) where !pointer.isNone {
                    if let checksum = seen[pointer.byteOffset] {
                        guard checksum == pointer.checksum else {
                            throw corrupt(group.kind.pageName, pointer.byteOffset, "page is referenced twice with different checksums")
                        }
                        continue
                    }
                    seen[pointer.byteOffset] = pointer.checksum
                    if i == 0 && rootsHere && roots[pointer.byteOffset] != nil { continue }
                    body(group.kind, pointer.byteOffset)
                }
            }
        }
    }

    /// A page loaded at open, with the first slot it covers.
    struct LoadedPage {
        var kind: PageKind
        var node: TreeNode
        var base: UInt64
    }

    /// Loads the page `pointer` names at `level`, covering slots from `base`, sharing
    /// nodes already loaded (a page reachable from two volumes is one node with two
    /// parents). Levels strictly decrease downwards, so a pointer cycle is impossible; a
    /// page met at two levels or as two kinds is corruption.
    ///
    /// A shared map page must also cover the same slots wherever it is reached (P-4:
    /// sharing comes only from snapshots and clones, which share a whole tree, and growth
    /// keeps the old root at slot 0). A slot position names one path from a root, so no
    /// page can then be reached twice within one map, and every walk of a map visits each
    /// page once: a crafted DAG whose interior slots all point to one child (254^4 leaf
    /// visits for `list`) is refused here.
    private func loadNode(_ pointer: PagePointer, kind: PageKind, level: Int, base: UInt64,
                          cache: inout [UInt64: LoadedPage], groups: inout [GroupKey: LeafGroup]) throws -> TreeNode? {
        guard !pointer.isNone else { return nil }
        let name = kind.pageName
        if let loaded = cache[pointer.byteOffset] {
            let node = loaded.node
            guard loaded.kind == kind, kind == .map, node.level == level, node.disk.checksum == pointer.checksum else {
                throw corrupt(name, pointer.byteOffset, "page is referenced twice with different kind, level or checksum")
            }
            guard loaded.base == base else {
                throw corrupt(name, pointer.byteOffset, "page is referenced at block index \(base) and at block index \(loaded.base): a shared page must cover the same blocks wherever it is reached (P-4)")
            }
            node.parentCount += 1
            return node
        }
        if level == 0 {
            // Leaves (map and block table) are read on first use, through the cache
            // (``PageCache``); a damaged one is reported then, by the call that needs it.
            // Open reads the interior pages only (ARCHITECTURE §5 step 2).
            guard geometry.isValidExtent(byteOffset: pointer.byteOffset, byteCount: UInt64(PoolGeometry.pageByteCount)) else {
                throw corrupt(name, pointer.byteOffset, "page pointer is outside every segment")
            }
            let node = TreeNode(kind: kind, level: 0, words: [], children: [], disk: pointer)
            cache[pointer.byteOffset] = LoadedPage(kind: kind, node: node, base: base)
            return node
        }
        let words = try readPage(pointer, kind: kind, level: level)
        if level == 1 {
            let node = try lazyLevelOne(kind, words, pointer, base: base, groups: &groups)
            cache[pointer.byteOffset] = LoadedPage(kind: kind, node: node, base: base)
            return node
        }
        var children: [TreeNode?] = []
        children.reserveCapacity(PageLayout.interiorFanout)
        for i in 0..<PageLayout.interiorFanout {
            children.append(try loadNode(PagePointer(byteOffset: words[2 * i], checksum: words[2 * i + 1]),
                                         kind: kind, level: level - 1,
                                         base: PageLayout.childBase(base, index: i, kind: kind, level: level), cache: &cache, groups: &groups))
        }
        let node = TreeNode(kind: kind, level: level, words: [], children: children, disk: pointer)
        cache[pointer.byteOffset] = LoadedPage(kind: kind, node: node, base: base)
        return node
    }

    /// A level-1 node whose leaves get nodes on first use (``LeafGroup``): its page's
    /// child pointers, each checked to lie inside a segment, and its place's group.
    private func lazyLevelOne(_ kind: PageKind, _ words: [UInt64], _ pointer: PagePointer, base: UInt64,
                              groups: inout [GroupKey: LeafGroup]) throws -> TreeNode {
        let pointers = PageLayout.childPointers(words)
        for child in pointers where !child.isNone {
            guard geometry.isValidExtent(byteOffset: child.byteOffset, byteCount: UInt64(PoolGeometry.pageByteCount)) else {
                throw corrupt(kind.pageName, child.byteOffset, "page pointer is outside every segment")
            }
        }
        let key = GroupKey(kind: kind, base: base)
        let group = groups[key] ?? LeafGroup(registry: leafRegistry, kind: kind, base: base)
        groups[key] = group
        return TreeNode(lazyLevelOne: kind, pointers: pointers, disk: pointer, group: group)
    }

    // MARK: - Replay

    /// Replays the journal from the superblock's replay start (Specs/COMMIT.md §4): stops
    /// at the first record that is torn, of another epoch, out of sequence, or whose data
    /// (for records not yet known durable) fails its checksum. A record that verifies but
    /// does not fit the state is corruption and throws.
    func replayJournal() throws {
        let ringByteCount = Int(geometry.journalByteCount)
        // Read on demand (an empty journal costs one small read, not the whole ring),
        // through a 64 KiB window that most records fall inside.
        var window: (start: Int, bytes: [UInt8]) = (0, [])
        func ringBytes(_ position: Int, _ count: Int) throws -> [UInt8] {
            if position >= window.start && position + count <= window.start + window.bytes.count {
                return Array(window.bytes[(position - window.start)..<(position - window.start + count)])
            }
            let length = min(max(count, 64 * 1024), ringByteCount - position)
            do {
                window = (position, try device.read(byteCount: length, at: PoolGeometry.journalByteOffset + UInt64(position)))
            } catch PoolError.io {
                // An unreadable sector somewhere in the window: read just what is needed
                // (if that fails too, the caller stops replay at this record).
                window = (position, try device.read(byteCount: count, at: PoolGeometry.journalByteOffset + UInt64(position)))
            }
            return Array(window.bytes[0..<count])
        }
        // Records below `durable` (the highest `durableSequence` seen) were synced together
        // with their data; later ones may be a torn batch whose data never landed. Records
        // are applied as the scan decodes them, except those not yet known synced: they
        // wait in `pending` (one batch or two, J-7 bounds a batch) until a later record's
        // mark covers them or the stretch ends, when their data is checked first. So
        // exactly the records at or above the stretch's final mark are checked, as if
        // they had all been collected first, without holding a full ring of records.
        var durable = superblock.journalReplaySequence
        var pending: [(offset: Int, record: JournalRecord)] = []
        // Where the scan stopped, unless a record's data stops replay earlier (below).
        var stop = ""
        func stopAt(_ ringOffset: Int, _ sequence: UInt64, torn: Bool, kind: ReplayStopKind) {
            recoveryReport.replayStopRingOffset = ringOffset
            recoveryReport.replayStopSequence = sequence
            recoveryReport.replayStopWasTorn = torn
            recoveryReport.replayStopKind = kind
        }
        var applied = 0
        var written: [(UInt64, UInt64)] = []
        var lastEpoch = superblock.generation
        var endPosition = Int(superblock.journalReplayByteOffset)
        var nextSequence = superblock.journalReplaySequence
        func applyRecord(_ offset: Int, _ record: JournalRecord) throws {
            try apply(record.intent, recordByteOffset: PoolGeometry.journalByteOffset + UInt64(offset))
            written += dataExtents(of: record.intent)
            applied += 1
            if case .relocate = record.intent { recoveryReport.replayedRelocateCount += 1 }
            lastEpoch = record.epoch
            nextSequence = record.sequence + 1
            if case .wrap = record.intent { endPosition = 0 } else { endPosition = offset + record.encodedByteCount }
        }
        func take(_ offset: Int, _ record: JournalRecord) throws {
            durable = max(durable, record.durableSequence)
            var covered = 0
            while covered < pending.count && pending[covered].record.sequence < durable {
                try applyRecord(pending[covered].offset, pending[covered].record)
                covered += 1
            }
            pending.removeFirst(covered)
            if pending.isEmpty && record.sequence < durable {
                try applyRecord(offset, record)
            } else {
                pending.append((offset, record))
            }
        }
        /// The stretch ended: check the data of the records no mark covered, in order,
        /// and apply them up to the first that fails (where replay stops).
        func finishStretch(_ scan: JournalScan) throws {
            stop = scan.stop.reason
            stopAt(scan.stop.ringOffset, scan.stop.sequence, torn: scan.stop.torn, kind: scan.stop.kind)
            defer { pending = [] }
            for (offset, record) in pending {
                if let failure = try dataFailure(record) {
                    stop = "record \(record.sequence) at ring offset \(offset): \(failure)"
                    stopAt(offset, record.sequence, torn: true, kind: .badDataChecksum)
                    if case .relocate = record.intent { recoveryReport.discardedRelocate = true }
                    return
                }
                try applyRecord(offset, record)
            }
        }
        try finishStretch(JournalScan.stream(ringByteCount: ringByteCount, start: Int(superblock.journalReplayByteOffset),
                                             sequence: superblock.journalReplaySequence, epoch: superblock.generation, salt: salt,
                                             read: ringBytes, visit: take))
        // Where each stretch began: a continuation never starts twice at one place.
        var starts: Set<Int> = [Int(superblock.journalReplayByteOffset)]
        while true {
            // J-8: a recovery from this very stop went on with records of its own (this
            // is a fallback to the slot that recovery replayed).
            let at = recoveryReport.replayStopRingOffset
            guard recoveryReport.replayStopKind != .endOfRing,
                  let next = JournalScan.recoveryContinuation(ringByteCount: ringByteCount, stop: at, sequence: recoveryReport.replayStopSequence,
                                                              epoch: lastEpoch, salt: salt, read: ringBytes),
                  let first = next.records.first, starts.insert(first.offset).inserted
            else { break }
            recoveryReport.findings.append("replay stopped at ring offset \(at) (\(stop)) and went on at the next sector boundary, ring offset \(first.offset), with the records of epoch \(first.record.epoch) that a recovery from that point wrote (FORMAT J-8)")
            for (offset, record) in next.records { try take(offset, record) }
            try finishStretch(next)
        }
        replayLastEpoch = lastEpoch
        recoveryReport.replayedRecordCount = applied
        recoveryReport.replayStopReason = stop
        removeHoles(overlapping: written)
        replayWrittenSegments = Set(written.compactMap { geometry.segmentIndex(containing: $0.0) })
        // The recovery commit closes the replayed epochs: until the commit after it, a
        // fallback to the slot replay started from reads these records again.
        noteEpochWrites(written)
        if lastEpoch > superblock.generation {
            // Chained into the newer slot's epoch: the next commit must go past it, so
            // that records of that epoch beyond the stop point can never be replayed.
            recoveryReport.findings.append("replay continued into epoch \(lastEpoch) of superblock generation \(lastEpoch), whose slot was not chosen")
            // One more, so the commit lands in the damaged slot of g+1, never over the
            // only valid one.
            superblock.generation = lastEpoch + 1
            superblock.slotIndex = Int((lastEpoch + 1) % 2)
        }
        let head = Int(sectorAligned(UInt64(endPosition))) % ringByteCount
        // The replayed records' ring bytes: the recovery commit keeps them for a fallback
        // to this slot, so new records do not overwrite them before the next commit.
        let start = Int(superblock.journalReplayByteOffset)
        var replayed = (head - start + ringByteCount) % ringByteCount
        if replayed == 0 && applied > 0 { replayed = ringByteCount }
        journal = JournalWriter(ringByteCount: geometry.journalByteCount, salt: salt, head: UInt64(head),
                                sequence: nextSequence, epoch: superblock.generation, usedByteCount: UInt64(replayed))
    }

    /// A valid record past the replay stop, of the replayed epochs, with a higher
    /// sequence and a durable mark above the stop: proof the stop is inside synced space
    /// (a record's `durableSequence` says every earlier record had been synced when it
    /// was written). Reads the ring in 1 MiB windows from the stop point round to it.
    func laterSyncedRecord() -> (sequence: UInt64, byteOffset: UInt64, durable: UInt64)? {
        let recovery = recoveryReport
        let generation = recovery.generation
        let ring = Int(geometry.journalByteCount)
        let sector = PoolGeometry.sectorByteCount
        let header = JournalRecordLayout.headerByteCount
        // The ring is read in 1 MiB windows (it may be large); a candidate record is read
        // whole only when its header decodes.
        var window: (start: Int, bytes: [UInt8]) = (0, [])
        var smallWindowsUntil = 0
        var position = (recovery.replayStopRingOffset / sector + 1) * sector
        var scanned = 0
        while scanned < ring {
            let at = position % ring
            position = at + sector
            scanned += sector
            guard ring - at >= header else { continue }
            if at < window.start || at + header > window.start + window.bytes.count {
                // Large windows; around an unreadable sector, 4 KiB and then one sector
                // at a time (the unreadable sector itself is skipped).
                let file = PoolGeometry.journalByteOffset + UInt64(at)
                if at >= smallWindowsUntil, let bytes = try? device.read(byteCount: min(1 << 20, ring - at), at: file) {
                    window = (at, bytes)
                } else if let bytes = try? device.read(byteCount: min(4096, ring - at), at: file) {
                    smallWindowsUntil = max(smallWindowsUntil, at + (1 << 20))
                    window = (at, bytes)
                } else if let bytes = try? device.read(byteCount: min(sector, ring - at), at: file) {
                    smallWindowsUntil = max(smallWindowsUntil, at + (1 << 20))
                    window = (at, bytes)
                } else {
                    continue
                }
            }
            let local = at - window.start
            let magic = window.bytes.withUnsafeBytes { $0.loadLE(UInt32.self, at: local) }
            guard magic == JournalRecordLayout.magic else { continue }
            let fileOffset = PoolGeometry.journalByteOffset + UInt64(at)
            let decoded = window.bytes.withUnsafeBytes { raw in
                Result { () throws(CorruptionError) in
                    try JournalRecord.decodeHeader(UnsafeRawBufferPointer(rebasing: raw[local..<local + header]), byteOffset: fileOffset)
                }
            }
            guard case .success(let h) = decoded, h.epoch >= generation, h.epoch <= max(generation, replayLastEpoch) + 2,
                  h.sequence > recovery.replayStopSequence, h.payloadByteCount <= ring - at - header,
                  let bytes = try? device.read(byteCount: header + h.payloadByteCount, at: fileOffset),
                  let record = try? JournalRecord.decode(bytes, salt: salt, byteOffset: fileOffset),
                  record.durableSequence > recovery.replayStopSequence
            else { continue }
            return (record.sequence, fileOffset, record.durableSequence)
        }
        return nil
    }

    /// The extents a record's data occupies (replay's hole bookkeeping, the writer's
    /// batch bound).
    func dataExtents(of intent: JournalIntent) -> [(UInt64, UInt64)] {
        switch intent {
        case .map(_, _, let mappings): return mappings.map { ($0.location.byteOffset, $0.location.allocatedByteCount) }
        case .mapRun(_, _, _, let offset, let stored, let checksums):
            return [(offset, UInt64(checksums.count) * sectorAligned(UInt64(stored)))]
        case .relocate(let moves): return moves.map { ($0.location.byteOffset, $0.location.allocatedByteCount) }
        default: return []
        }
    }

    /// Drops every part of a hole that overlaps one of `extents` (sorted sweep).
    private func removeHoles(overlapping extents: [(UInt64, UInt64)]) {
        guard !holes.isEmpty, !extents.isEmpty else { return }
        let taken = extents.sorted { $0.0 < $1.0 }
        var result: [(byteOffset: UInt64, byteCount: UInt64)] = []
        var t = 0
        for hole in holes.sorted(by: { $0.byteOffset < $1.byteOffset }) {
            var start = hole.byteOffset
            let end = hole.byteOffset + hole.byteCount
            while t < taken.count && taken[t].0 + taken[t].1 <= start { t += 1 }
            var k = t
            while k < taken.count && taken[k].0 < end && start < end {
                if taken[k].0 > start { result.append((start, taken[k].0 - start)) }
                start = max(start, taken[k].0 + taken[k].1)
                k += 1
            }
            if start < end { result.append((start, end - start)) }
        }
        // Trim the pieces to whole 4 KiB units, as rebuildHoles does.
        space.setHoles(SegmentSpace.wholeUnits(of: result))
    }

    /// Why a record's data does not verify, or nil when it does (or it has none).
    private func dataFailure(_ record: JournalRecord) throws -> String? {
        var locations: [BlockLocation] = []
        switch record.intent {
        case .map(_, _, let mappings): locations = mappings.map(\.location)
        case .mapRun(_, let index, let id, let offset, let stored, let checksums):
            let count = UInt64(checksums.count)
            guard count.multipliedReportingOverflow(by: UInt64(stored)).overflow == false,
                  offset.addingReportingOverflow(count * UInt64(stored)).overflow == false
            else { return "block run overflows" }
            locations = JournalIntent.runMappings(firstBlockIndex: index, firstBlockID: id, firstByteOffset: offset,
                                                  storedByteCount: stored, checksums: checksums).map(\.location)
        case .relocate(let moves): locations = moves.map(\.location)
        default: return nil
        }
        for location in locations {
            guard isValidEntry(location) else { return "block location \(location.byteOffset) is invalid" }
            let stored: [UInt8]
            do {
                stored = try device.read(byteCount: Int(location.storedByteCount), at: location.byteOffset)
            } catch PoolError.io(let code, _, _) {
                return "data at byte offset \(location.byteOffset) is unreadable (errno \(code))"
            }
            if Checksum.xxh3(stored) != location.checksum {
                return "data at byte offset \(location.byteOffset) fails its checksum (torn batch)"
            }
        }
        return nil
    }
}
