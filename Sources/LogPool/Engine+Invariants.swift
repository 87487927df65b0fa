import LogPoolFormat

extension Engine {
    /// Recomputes every derived figure from the trees and compares it with what the engine
    /// maintains incrementally: block refcounts (from unique map leaves), node parent
    /// counts, dirty-page count, per-segment data bytes, and, right after a checkpoint,
    /// per-segment metadata bytes. Returns one line per mismatch; empty means consistent.
    /// Tests call it after every operation ("strict mode").
    func checkInvariants() -> [String] {
        var problems = catalog.problems()
        let rootByteCount = plannedRoot().unpaddedByteCount
        if plannedRootUnpaddedByteCount != rootByteCount {
            problems.append("volume row bytes \(volumeRowByteTotal) do not match the volume table (root \(rootByteCount) bytes unpadded)")
        }
        var parents: [ObjectIdentifier: Int] = [:]
        var nodes: [ObjectIdentifier: TreeNode] = [:]
        var kinds: [ObjectIdentifier: PageKind] = [:]
        // Leaves of level-1 nodes whose leaves have no nodes yet (``LeafGroup``): one
        // stand-in per page, not a node of any tree (its words are read from its page,
        // not through the cache; it has no parent count to check). This walk creates
        // no leaf, so it leaves lazy map leaves lazy; the count and location lookups
        // below reach refcount and block-table leaves as any lookup does.
        var standIns: [UInt64: TreeNode] = [:]
        var standInIDs = Set<ObjectIdentifier>()
        func visit(_ node: TreeNode, kind: PageKind) {
            let key = ObjectIdentifier(node)
            parents[key, default: 0] += 1
            guard nodes[key] == nil else { return }
            nodes[key] = node
            kinds[key] = kind
            switch node.childrenSnapshot {
            case .ready(let children):
                for child in children { if let child { visit(child, kind: kind) } }
            case .pending(let pointers):
                for pointer in pointers where !pointer.isNone {
                    let standIn = standIns[pointer.byteOffset] ?? TreeNode(kind: kind, level: 0, words: [], children: [], disk: pointer)
                    standIns[pointer.byteOffset] = standIn
                    standInIDs.insert(ObjectIdentifier(standIn))
                    visit(standIn, kind: kind)
                }
            }
        }
        if let root = blockTable.root { visit(root, kind: .blockTable) }
        for map in allMaps { if let root = map.root { visit(root, kind: .map) } }
        if let root = refcountTree.root { visit(root, kind: .refcounts) }
        var expectedRefcounts = [UInt32](repeating: 0, count: Int(blockIDLimit))
        var dirty = 0, dirtyLeaves = 0
        var meta = [UInt64](repeating: 0, count: segmentStates.count)
        for (key, node) in nodes {
            if !standInIDs.contains(key), node.parentCount != parents[key] {
                problems.append("node at level \(node.level) has parent count \(node.parentCount), found \(parents[key] ?? 0) parents")
            }
            if node.isDirty { dirty += 1 } else { meta[segment(of: node.disk.byteOffset)] += UInt64(PoolGeometry.pageByteCount) }
            if node.isDirty && node.level == 0 && kinds[key] != .refcounts { dirtyLeaves += 1 }
            if kinds[key] == .map && node.level == 0 {
                let read = standInIDs.contains(key) ? { try self.readMapLeaf(node.disk) } : { try self.leafWords(node) }
                guard let words = try? read() else {
                    problems.append("map leaf at \(node.disk.byteOffset) cannot be read")
                    continue
                }
                for id in words where id != 0 {
                    guard id < blockIDLimit else { problems.append("map names block \(id) beyond limit"); continue }
                    expectedRefcounts[Int(id)] += 1
                }
            }
        }
        if dirty != dirtyPageCount { problems.append("dirty page count \(dirtyPageCount), found \(dirty)") }
        if dirtyLeaves != dirtyLeafCount { problems.append("dirty leaf count \(dirtyLeafCount), found \(dirtyLeaves) dirty map and table leaves") }
        var data = [UInt64](repeating: 0, count: segmentStates.count)
        for id in 1..<Int(blockIDLimit) {
            // Leaves not resident are read from the refcount tree: they are the counts.
            guard let count = try? refcount(UInt64(id)) else {
                problems.append("block \(id): its refcount leaf cannot be read")
                continue
            }
            if count != expectedRefcounts[id] {
                problems.append("block \(id): refcount \(count), rebuilt \(expectedRefcounts[id])")
            }
            if expectedRefcounts[id] > 0 {
                guard let location = try? blockLocation(UInt64(id)) else {
                    problems.append("block \(id): its block-table leaf cannot be read, or its entry is invalid")
                    continue
                }
                data[segment(of: location.byteOffset)] += location.allocatedByteCount
            }
        }
        for s in 0..<segmentStates.count where data[s] != dataLiveByteCounts[s] {
            problems.append("segment \(s): data live \(dataLiveByteCounts[s]), rebuilt \(data[s])")
        }
        if liveBlockCount != expectedRefcounts.reduce(0, { $0 + ($1 > 0 ? 1 : 0) }) { problems.append("live block count \(liveBlockCount) drifted") }
        if dataLiveTotal != dataLiveByteCounts.reduce(0, +) { problems.append("data live total drifted") }
        if metaLiveTotal != metaLiveByteCounts.reduce(0, +) { problems.append("meta live total drifted") }
        if dirtyPageCount == 0 && pendingPageReleases.isEmpty, let root = checkpointExtent {
            meta[segment(of: root.byteOffset)] += sectorAligned(root.byteCount)
            for s in 0..<segmentStates.count where meta[s] != metaLiveByteCounts[s] {
                problems.append("segment \(s): meta live \(metaLiveByteCounts[s]), rebuilt \(meta[s])")
            }
        }
        for s in 0..<segmentStates.count where segmentStates[s] == .free && liveByteCount(s) != 0 {
            problems.append("segment \(s) is free but holds \(liveByteCount(s)) live bytes")
        }
        problems += storedRefcountProblems()
        if blockTable.capacity < blockIDLimit { problems.append("block table of height \(blockTable.height) cannot hold \(blockIDLimit) ids") }
        if let open = openSegment, segmentStates[open] != .open { problems.append("open segment \(open) not in state open") }
        return problems
    }
}

extension Engine {
    /// Where the refcount tree's clean leaves whose counts have not changed since they
    /// were written (the next checkpoint leaves them as they are) differ from ``ids``: a
    /// change to a count that did not mark its leaf changed. Reads their pages.
    func storedRefcountProblems() -> [String] {
        var problems: [String] = []
        let perLeaf = UInt64(PageLayout.wordCapacity)
        func check(_ node: TreeNode, base: UInt64) {
            if node.level > 0 {
                let children: [TreeNode?]
                switch node.childrenSnapshot {
                case .ready(let ready): children = ready
                case .pending(let pointers):
                    // Leaves without nodes yet: stand-ins for their pages (clean).
                    children = pointers.map { $0.isNone ? nil : TreeNode(kind: .refcounts, level: 0, words: [], children: [], disk: $0) }
                }
                for (i, child) in children.enumerated() {
                    if let child { check(child, base: PageLayout.childBase(base, index: i, kind: .refcounts, level: node.level)) }
                }
                return
            }
            let leaf = Int(base / perLeaf)
            let leafCount = BlockIDs.leafCount(blockIDLimit)
            guard !node.isDirty, leaf >= leafCount || !ids.isChanged(leaf: leaf) else { return }
            guard let words = try? readPage(node.disk, kind: .refcounts, level: 0) else {
                return problems.append("refcount leaf \(leaf): its page cannot be read")
            }
            if leaf >= leafCount {
                if words.contains(where: { $0 != 0 }) { problems.append("refcount leaf \(leaf) beyond the id limit holds counts") }
            } else if (try? ids.differs(leaf: leaf, from: words, load: storedRefcountWords)) ?? true {
                problems.append("refcount leaf \(leaf): stored counts differ from the counts in memory, and it is not marked changed")
            }
        }
        if let root = refcountTree.root { check(root, base: 0) }
        return problems
    }
}

extension Engine {
    /// Where this engine's space state differs from `reopened`'s, an engine opened on
    /// this pool's bytes after a sync (issue 14, invariant 3: the running engine must
    /// not know less, or more, about space than a reopen rebuilds): per segment the live
    /// data and metadata bytes and whether it is free, the totals, and the live block
    /// count. Each line names both values. Holes are not compared: the running engine
    /// forgets them at every checkpoint and rebuilds them when it needs space, while an
    /// open rebuilds them at once.
    func spaceStateDifferences(from reopened: Engine) -> [String] {
        var differences: [String] = []
        guard segmentStates.count == reopened.segmentStates.count else {
            return ["segment count \(segmentStates.count), reopened \(reopened.segmentStates.count)"]
        }
        // A segment kept only for the older slot's replay is free to a reopen,
        // which does not know what that slot's epoch wrote: a read-write open writes no
        // record before a commit has replaced that slot (only a recovery commit's pages),
        // COMMIT §5.2. (So a commit path that forgot to release the kept set would show
        // here as nothing; the crash simulation's space checks see it as a leak.)
        let kept = fallbackSegments.filter {
            segmentStates[$0] != .free && reopened.segmentStates[$0] == .free && liveByteCount($0) == 0
        }
        for s in 0..<segmentStates.count {
            if dataLiveByteCounts[s] != reopened.dataLiveByteCounts[s] {
                differences.append("segment \(s): data live \(dataLiveByteCounts[s]), reopened \(reopened.dataLiveByteCounts[s])")
            }
            if metaLiveByteCounts[s] != reopened.metaLiveByteCounts[s] {
                differences.append("segment \(s): metadata live \(metaLiveByteCounts[s]), reopened \(reopened.metaLiveByteCounts[s])")
            }
            if (segmentStates[s] == .free) != (reopened.segmentStates[s] == .free), !kept.contains(s) {
                differences.append("segment \(s): \(segmentStates[s]), reopened \(reopened.segmentStates[s])")
            }
        }
        if dataLiveTotal != reopened.dataLiveTotal { differences.append("data live total \(dataLiveTotal), reopened \(reopened.dataLiveTotal)") }
        if metaLiveTotal != reopened.metaLiveTotal { differences.append("metadata live total \(metaLiveTotal), reopened \(reopened.metaLiveTotal)") }
        if liveBlockCount != reopened.liveBlockCount { differences.append("live blocks \(liveBlockCount), reopened \(reopened.liveBlockCount)") }
        if freeSegments.count + kept.count != reopened.freeSegments.count {
            differences.append("free segments \(freeSegments.count), reopened \(reopened.freeSegments.count)")
        }
        return differences
    }
}

extension Pool {
    /// Consistency problems in the in-memory state (empty when consistent). For tests and
    /// `verify`; it walks every tree, so it is not for hot paths.
    public func internalConsistencyProblems() -> [String] {
        locked { engine.checkInvariants() }
    }

    /// Metadata-cache events since open, for the crash simulation's coverage: map and
    /// block-table leaves read again after eviction, refcount leaves read again after
    /// being dropped, checkpoints started by the dirty-leaf bound, and leaves shared by
    /// level-1 nodes open read, created on first use (``LeafGroup``).
    public var cacheEvents: CacheEvents {
        locked {
            CacheEvents(leafRereads: engine.pageCache.rereadCount, refcountRereads: engine.ids.rereadCount,
                        boundCheckpoints: engine.dirtyBoundCheckpointCount, sharedLeafCreations: engine.leafRegistry.sharedGroupCount)
        }
    }

    /// See ``cacheEvents``.
    public struct CacheEvents: Sendable {
        public var leafRereads: Int
        public var refcountRereads: Int
        public var boundCheckpoints: Int
        public var sharedLeafCreations: Int
    }

    /// Differences between this pool's space state and `reopened`'s, a pool opened on
    /// this pool's bytes right after ``sync()`` (for tests: invariant 3 of issue 14).
    /// Only meaningful while ``hasUnsyncedChanges`` is false.
    public func spaceStateDifferences(from reopened: Pool) -> [String] {
        locked { reopened.locked { engine.spaceStateDifferences(from: reopened.engine) } }
    }
}
