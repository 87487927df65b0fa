import LogPoolFormat

extension Engine {
    /// The root the next checkpoint would write (usage values are filled in later; the
    /// encoded size does not depend on them).
    func plannedRoot() -> CheckpointRoot {
        let records = volumes.values.sorted { $0.record.id < $1.record.id }.map { v -> VolumeRecord in
            var r = v.record
            r.mapRoot = v.map.root?.disk ?? .none
            r.mapHeight = v.map.height
            return r
        }
        let queue = releaseQueue.map {
            QueuedMapRecord(id: $0.id, mapRoot: $0.map.root?.disk ?? .none, mapHeight: $0.map.height, releasedSlotCount: $0.releasedSlotCount)
        }
        return CheckpointRoot(generation: superblock.generation + 1, nextVolumeID: nextVolumeID,
                              blockTableRoot: blockTable.root?.disk ?? .none, blockTableHeight: blockTable.height,
                              blockIDLimit: blockIDLimit, volumes: records,
                              segmentLiveByteCounts: metaLiveByteCounts,
                              refcountRoot: refcountTree.root?.disk ?? .none, refcountHeight: refcountTree.height,
                              liveBlockCount: UInt64(ids.liveCount), releaseQueue: queue)
    }

    /// Puts every refcount leaf whose counts changed since the last checkpoint into the
    /// refcount tree as a dirty page holding its words, and fills the words of leaves
    /// compaction dirtied (their pages moved), so this checkpoint writes the counts its
    /// maps imply (FORMAT §5.4). Room for every refcount page was reserved by admission
    /// (``refcountPageBound``), so no change ever needs room it was not given.
    func stageRefcounts() throws {
        grow(&refcountTree, toCover: (blockIDLimit + 1) / 2)
        let perLeaf = UInt64(PageLayout.wordCapacity)
        for leaf in ids.takeChangedLeaves() {
            let words = try ids.packedWords(leaf: leaf, load: storedRefcountWords)
            let (node, _) = try leafForWriting(&refcountTree, slot: UInt64(leaf) * perLeaf)
            node.words = words
        }
        // A dirty leaf's parent is dirty, so only dirty interior nodes are walked.
        func fill(_ node: TreeNode, base: UInt64) throws {
            guard node.isDirty else { return }
            if node.level == 0 {
                // Compaction reads a leaf it moves (``markDirty``); this is a fallback.
                if node.words.isEmpty { node.words = try ids.packedWords(leaf: Int(base / perLeaf), load: storedRefcountWords) }
                return
            }
            for (i, child) in node.children.enumerated() {
                if let child { try fill(child, base: PageLayout.childBase(base, index: i, kind: .refcounts, level: node.level)) }
            }
        }
        if let root = refcountTree.root { try fill(root, base: 0) }
    }

    /// Where appends go on after this commit's sync (the open segment's append point
    /// rounded up to 4 KiB), recorded in the root so a clean open resumes there without
    /// finding holes; 0 when no segment is open or nothing of it is left.
    func resumePoint() -> UInt64 {
        guard let open = openSegment else { return 0 }
        let unit = UInt64(PoolGeometry.durableAlignmentByteCount)
        let end = geometry.segmentByteOffset(open) + UInt64(geometry.segmentByteCount)
        let at = (appendByteOffset + unit - 1) & ~(unit - 1)
        return at < end ? at : 0
    }

    /// Makes everything journaled so far durable: pads the journal tail to 4 KiB,
    /// writes it, one fsync for data and journal together (Specs/COMMIT.md §2).
    func sync() throws {
        try checkUsable()
        guard !readOnly else { return }
        try writeJournalBatch()
        try deviceSync()
        journal.markDurable()
        unsyncedDataByteCount = 0
    }

    /// Pads the journal's buffered records to a 4 KiB boundary and writes them (the part of
    /// a sync before its fsync).
    private func writeJournalBatch() throws {
        if let batch = journal.takeBatch() {
            try deviceWrite(batch.bytes, at: PoolGeometry.journalByteOffset + batch.ringByteOffset)
        }
    }

    /// What a sync whose fsync runs outside the lock covers: the journal through
    /// `sequence` (exclusive), `usedByteCount` ring bytes of epoch `epoch`.
    struct SyncTicket {
        var sequence: UInt64
        var usedByteCount: UInt64
        var epoch: UInt64
    }

    /// The part of a group-commit sync under the lock (COMMIT §7): the journal batch is
    /// written, queued payloads reach the device, later appends and hole reuse move to
    /// whole 4 KiB units beyond everything written so far. The caller then fsyncs without
    /// the lock and calls ``finishSync(_:failure:)`` with it.
    func beginSync() throws -> SyncTicket {
        try checkWritable()
        try writeJournalBatch()
        try deviceCall {}
        let ticket = SyncTicket(sequence: journal.nextSequence, usedByteCount: journal.usedByteCount, epoch: journal.epoch)
        deviceDirty = false
        unsyncedDataByteCount = 0
        alignAfterSync()
        syncInFlight = true
        return ticket
    }

    /// Under the lock again after the fsync of ``beginSync()``: the records it covered
    /// are durable, or the pool is poisoned (a failed fsync loses what it covered).
    func finishSync(_ ticket: SyncTicket, failure: (any Error)?) {
        syncInFlight = false
        if let failure {
            poisonCause = (failure as? PoolError)?.description ?? "\(failure)"
            deviceDirty = true
        } else {
            journal.markDurable(through: ticket.sequence, usedByteCount: ticket.usedByteCount, epoch: ticket.epoch)
        }
    }

    /// Writes a checkpoint and commits it with the older superblock slot
    /// (Specs/COMMIT.md §3):
    ///
    /// 1. sync the journal (so a crash before step 5 replays everything up to here);
    /// 2. write every dirty page, children before parents, into free segment space;
    /// 3. write the root (volume table, block-table root, segment usage) after them;
    /// 4. fsync;
    /// 5. write superblock slot (generation+1) % 2, fsync: the commit point;
    /// 6. in memory: released pages stop counting, empty segments become free, the
    ///    journal restarts at its current position under the new epoch.
    func checkpoint(mounted: Bool = true) throws {
        try exclusively { try writeCheckpoint(mounted: mounted) }
    }

    private func writeCheckpoint(mounted: Bool) throws {
        try checkWritable()
        try sync()
        try stageRefcounts()
        if journal.nextSequence == superblock.journalReplaySequence && dirtyPageCount == 0
            && pendingPageReleases.isEmpty && checkpointExtent != nil && !rootNeedsRewrite {
            if let cause = poisonCause { throw PoolError.poisoned(cause) }
            return try commitSuperblockOnly(mounted: mounted)
        }
        var batch = WriteBatch()
        var newMeta = metaLiveByteCounts
        for offset in pendingPageReleases { newMeta[segment(of: offset)] -= UInt64(PoolGeometry.pageByteCount) }
        // Map and table leaves written here join the cache once committed (evictable
        // from then on).
        var writtenLeaves: [TreeNode] = []
        // Refcount leaves drop their words once written (``ids`` holds the counts).
        var writtenRefcountLeaves: [TreeNode] = []
        func writeDirty(_ node: TreeNode, kind: PageKind) throws {
            guard node.isDirty else { return }
            if kind != .refcounts && node.level == 0 { writtenLeaves.append(node) }
            if kind == .refcounts && node.level == 0 { writtenRefcountLeaves.append(node) }
            var words: [UInt64]
            if case .pending(let pointers) = node.childrenSnapshot {
                // A level-1 node made dirty in place whose leaves have no nodes yet: its
                // children are its old page's, unchanged.
                words = []
                words.reserveCapacity(pointers.count * 2)
                for child in pointers {
                    words.append(child.byteOffset)
                    words.append(child.checksum)
                }
            } else if node.level > 0 {
                words = []
                words.reserveCapacity(PageLayout.interiorFanout * 2)
                for child in node.children {
                    if let child {
                        try writeDirty(child, kind: kind)
                        words.append(child.disk.byteOffset)
                        words.append(child.disk.checksum)
                    } else {
                        words.append(0)
                        words.append(0)
                    }
                }
            } else {
                words = node.words
            }
            let page = PageLayout.encode(kind: kind, level: node.level, words: words, salt: salt)
            let offset = try allocateExtent(byteCount: PoolGeometry.pageByteCount, alignment: PoolGeometry.pageByteCount, batch: &batch)
            // Decode after encode: a page that would not read back as meant is a bug
            // caught before anything is written, not metadata the next open refuses.
            let decoded = Result { () throws(CorruptionError) in
                try PageLayout.decode(page.bytes, kind: kind, level: node.level, expectedChecksum: page.checksum, salt: salt, byteOffset: offset)
            }
            switch decoded {
            case .failure(let error):
                throw encodingFailure("a \(kind) page of level \(node.level) does not decode: \(error)")
            case .success(let back) where back != words:
                throw encodingFailure("a \(kind) page of level \(node.level) decodes to other slots than it was encoded with")
            case .success:
                break
            }
            batch.add(page.bytes, at: offset)
            newMeta[segment(of: offset)] += UInt64(PoolGeometry.pageByteCount)
            node.disk = PagePointer(byteOffset: offset, checksum: page.checksum)
        }
        if let root = blockTable.root { try writeDirty(root, kind: .blockTable) }
        if let root = refcountTree.root { try writeDirty(root, kind: .refcounts) }
        for volume in volumes.values {
            if let root = volume.map.root { try writeDirty(root, kind: .map) }
        }
        for queued in releaseQueue {
            if let root = queued.map.root { try writeDirty(root, kind: .map) }
        }
        var root = plannedRoot()
        let rootByteCount = root.encodedByteCount
        let rootOffset = try allocateExtent(byteCount: rootByteCount, batch: &batch)
        if let old = checkpointExtent { newMeta[segment(of: old.byteOffset)] -= sectorAligned(old.byteCount) }
        newMeta[segment(of: rootOffset)] += UInt64(rootByteCount)
        root.segmentLiveByteCounts = zip(dataLiveByteCounts, newMeta).map { $0 + $1 }
        root.resumeByteOffset = resumePoint()
        let encodedRoot = root.encode(salt: salt)
        let decodedRoot = Result { () throws(CorruptionError) in
            try CheckpointRoot.decode(encodedRoot.bytes, expectedChecksum: encodedRoot.checksum, salt: salt,
                                      byteOffset: rootOffset, geometry: geometry)
        }
        switch decodedRoot {
        case .failure(let error):
            throw encodingFailure("the checkpoint root does not decode: \(error)")
        case .success(let back) where back != root:
            throw encodingFailure("the checkpoint root decodes to other contents than it was encoded with")
        case .success:
            break
        }
        batch.add(encodedRoot.bytes, at: rootOffset)
        // Staging and walking the trees may have created leaves and found a page named
        // at two places (COMMIT §3.2): nothing is committed on that state.
        if let cause = poisonCause { throw PoolError.poisoned(cause) }
        try deviceWrite(batch)
        try deviceSync()

        let generation = superblock.generation + 1
        var next = superblock
        next.slotIndex = Int(generation % 2)
        next.generation = generation
        next.checkpointByteOffset = rootOffset
        next.checkpointByteCount = UInt64(rootByteCount)
        next.checkpointChecksum = encodedRoot.checksum
        next.journalReplayByteOffset = journal.position % journal.ringByteCount
        next.journalReplaySequence = journal.nextSequence
        next.parentChecksum = superblock.checksum
        next.flags = mounted ? Superblock.flagMounted : 0
        let slotBytes = next.encode()
        try deviceWrite(slotBytes, at: PoolGeometry.superblockSlotByteOffsets[next.slotIndex])
        try deviceSync()

        // Committed. Space dead since the previous commit becomes reusable below (free
        // segments, holes): reads planned before it must be done with it first.
        readers.waitUntilIdle()
        // Holes were computed against the previous commit; recompute on demand.
        space.forgetHoles()
        superblock = next
        space.setMetaLive(newMeta)
        checkpointExtent = (rootOffset, UInt64(rootByteCount))
        pendingPageReleases.removeAll()
        dirtyPageCount = 0
        dirtyLeafCount = 0
        journal.resetAfterCheckpoint(epoch: generation)
        // Segments with nothing live left become free, the open one too, except
        // those the older slot's replay still reads.
        rollFallbackExtents()
        checkpointCount += 1
        rootNeedsRewrite = false
        pageCache.admit(writtenLeaves)
        for leaf in writtenRefcountLeaves { leaf.words = [] }
    }

    /// A checkpoint's own output failed decode-after-encode: a bug. The pool is poisoned
    /// (nothing of this checkpoint is committed; a reopen recovers the durable state).
    func encodingFailure(_ detail: String) -> PoolError {
        poisonCause = "checkpoint refused: \(detail)"
        return PoolError.poisoned(poisonCause ?? detail)
    }

    /// Nothing changed since the last checkpoint (no journal record, no dirty page): the
    /// durable root still describes the state, so only a new slot is committed (for the
    /// mounted flag and a fresh epoch). Same crash analysis as step 5 of a checkpoint.
    private func commitSuperblockOnly(mounted: Bool) throws {
        let generation = superblock.generation + 1
        var next = superblock
        next.slotIndex = Int(generation % 2)
        next.generation = generation
        next.journalReplayByteOffset = journal.position % journal.ringByteCount
        next.journalReplaySequence = journal.nextSequence
        next.parentChecksum = superblock.checksum
        next.flags = mounted ? Superblock.flagMounted : 0
        try deviceWrite(next.encode(), at: PoolGeometry.superblockSlotByteOffsets[next.slotIndex])
        try deviceSync()
        readers.waitUntilIdle()
        superblock = next
        space.forgetHoles()
        journal.resetAfterCheckpoint(epoch: generation)
        rollFallbackExtents()
        checkpointCount += 1
    }

    func rebuildFreeSegmentList() {
        space.rebuildFreeList()
    }
}
