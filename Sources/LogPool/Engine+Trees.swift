import LogPoolFormat

/// Copy-on-write tree operations. Block refcounts count the map *leaves* that name a block;
/// node `parentCount`s count parents. Copying a shared leaf therefore adds one reference to
/// every block it names, and copying a shared interior node adds a parent to each child.
extension Engine {
    // MARK: - Node lifecycle

    /// Makes `node` safe to change through the parent that holds `slot`: copies it when it
    /// is shared, or marks it dirty (its old page is released at the next checkpoint).
    /// An evicted leaf is read back first, in the same step, so no load can evict it
    /// between being read and being pinned as dirty (``PageCache``).
    func makeUnique(_ slot: inout TreeNode, kind: PageKind) throws {
        try makeResident(slot)
        if slot.parentCount > 1 {
            let copy = TreeNode(copying: slot)
            if copy.level > 0 {
                for child in copy.children { child?.parentCount += 1 }
            } else if kind == .map {
                for id in copy.words where id != 0 { try ids.retain(id, load: storedRefcountWords) }
            }
            slot.parentCount -= 1
            slot = copy
            dirtyPageCount += 1
            if kind != .refcounts && copy.level == 0 { dirtyLeafCount += 1 }
        } else if !slot.isDirty {
            pendingPageReleases.append(slot.disk.byteOffset)
            slot.disk = .none
            dirtyPageCount += 1
            if kind != .refcounts && slot.level == 0 { dirtyLeafCount += 1 }
        }
    }

    func newNode(kind: PageKind, level: Int) -> TreeNode {
        dirtyPageCount += 1
        if kind == .blockTable { blockTableNodeCount += 1 }
        if kind == .refcounts { refcountNodeCount += 1 }
        if kind != .refcounts && level == 0 { dirtyLeafCount += 1 }
        return TreeNode(kind: kind, level: level)
    }

    /// Drops one parent of `node`; when none is left, releases its page and its children
    /// (map leaves drop a reference to every block they name).
    func release(_ node: TreeNode, kind: PageKind) throws {
        node.parentCount -= 1
        guard node.parentCount == 0 else { return }
        if node.isDirty {
            dirtyPageCount -= 1
            if kind != .refcounts && node.level == 0 { dirtyLeafCount -= 1 }
        } else {
            pendingPageReleases.append(node.disk.byteOffset)
        }
        if node.level > 0 {
            for child in node.children { if let child { try release(child, kind: kind) } }
        } else if kind == .map {
            for id in try leafWords(node) where id != 0 { try dropBlockReference(id) }
            // No tree names it any more: out of the cache now, dirty or not (a dirty
            // leaf is never evicted, so a released one would stay pinned for good).
            pageCache.forget(node)
        }
    }

    // MARK: - The release queue (ARCHITECTURE §5 step 4)

    /// Whole map leaves one release step may empty: each drops up to 509 block
    /// references, so a step changes at most this many leaves' worth of counts.
    static let leavesPerReleaseStep = 16

    /// Every map the pool holds: the volumes' and the queued maps of deleted ones.
    var allMaps: [Tree] { volumes.values.map(\.map) + releaseQueue.map(\.map) }

    /// Where the next release step of `queued` ends (COMMIT §6.1): the whole map when its
    /// root is shared (the step drops one parent) or a single leaf; else, below the
    /// nodes on the path to the first slot not yet released (all with one parent), the
    /// next child subtree that is shared (dropped whole: one parent less) or, at the
    /// leaves' level, up to ``leavesPerReleaseStep`` whole leaves; the end of a node
    /// with nothing left. Steps are aligned to whole subtrees, so a step never copies a
    /// shared node and changes at most that many leaves' counts.
    func nextReleaseBound(_ queued: QueuedMap) -> UInt64 {
        let map = queued.map
        let capacity = map.capacity
        guard var node = map.root, node.parentCount == 1, node.level > 0 else { return capacity }
        var base: UInt64 = 0
        let released = queued.releasedSlotCount
        while true {
            let span = map.span(level: node.level)
            let end = base + span * UInt64(PageLayout.interiorFanout)
            var i = Int((max(released, base) - base) / span)
            while i < PageLayout.interiorFanout && node.children[i] == nil { i += 1 }
            guard i < PageLayout.interiorFanout, let child = node.children[i] else { return min(capacity, end) }
            let childBase = base + UInt64(i) * span
            if child.parentCount > 1 { return min(capacity, childBase + span) }
            if child.level == 0 { return min(capacity, end, childBase + span * UInt64(Engine.leavesPerReleaseStep)) }
            node = child
            base = childBase
        }
    }

    /// One bounded step of the release queue (COMMIT §6.1): releases the next part of
    /// the oldest queued map as a `releaseQueued` record, admitted like any change (a
    /// refusal changes nothing). Returns false when the queue is empty or a step is
    /// already running.
    @discardableResult
    func reclaimStep() throws -> Bool {
        guard !reclaiming, !readOnly, let queued = releaseQueue.first(where: { !stuckQueueIDs.contains($0.id) }) else { return false }
        reclaiming = true
        defer { reclaiming = false }
        let payload = JournalIntent.releaseQueued(id: 0, upTo: 0).payloadByteCount
        try ensureJournalSpace(payloadByteCount: payload)
        // Each boundary path may be made dirty; counts change for at most the step's leaves.
        try ensureSpace(netByteCount: 0, extents: [], pageCount: 2 * queued.map.height, addedPageCount: 0,
                        countChanges: Engine.leavesPerReleaseStep * PageLayout.mapLeafFanout)
        try keepJournalRoom(payloadByteCount: payload)
        let upTo = nextReleaseBound(queued)
        do {
            try withRefcountRepair { try pinRefcounts(unmapping: queued.releasedSlotCount..<upTo, in: queued.map) }
        } catch let error as PoolError {
            // A map leaf of it cannot be read: its release waits (this session) while
            // the other queued maps go on; verify reports the damage.
            switch error {
            case .io, .corrupt: stuckQueueIDs.insert(queued.id)
            default: break
            }
            throw error
        }
        try exclusively { try journalAndApply(.releaseQueued(id: queued.id, upTo: upTo)) }
        return true
    }

    /// Release steps run after each write, discard or delete while the queue holds maps.
    static let releaseStepsBetweenChanges = 4

    /// Release steps between changes (after a write, discard or delete), when the queue
    /// holds maps: bounded work (``releaseStepsBetweenChanges`` steps), so a deleted
    /// volume's space comes back while writes go on, and a small one is gone by the
    /// time its delete returns. A step that cannot be admitted now is left for later;
    /// one that failed after journaling poisoned the pool, which the next call reports.
    func reclaimBetweenChanges() {
        for _ in 0..<Engine.releaseStepsBetweenChanges where !releaseQueue.isEmpty {
            guard (try? reclaimStep()) == true else { return }
        }
    }

    /// Before an operation computes its admission figures: when rule A-1 leaves less than
    /// `byteCount` (with `newBlockCount` more ids) while maps wait in the release queue,
    /// releases them until it does (COMMIT §5.4), so the figures the operation then
    /// computes (shared blocks that became its own, the ids it will take) are current.
    func releaseQueuedSpace(ifShortOf byteCount: UInt64, newBlockCount: Int = 0) throws {
        guard !releaseQueue.isEmpty, !reclaiming, logicalRoomByteCount(newBlockCount: newBlockCount) < byteCount else { return }
        try drainReleaseQueue { logicalRoomByteCount(newBlockCount: newBlockCount) >= byteCount }
    }

    /// Runs release steps until the queue is empty (``Pool/compact()``, or admission
    /// short of room while the queue holds space).
    /// A step refused for room ends the drain (the caller's own admission then decides);
    /// a queued map that cannot be read is left (``stuckQueueIDs``) and the others go
    /// on. Only a failure that poisoned the pool is thrown.
    func drainReleaseQueue(until done: () -> Bool = { false }) throws {
        while !releaseQueue.isEmpty && !done() {
            do {
                guard try reclaimStep() else { return }
            } catch {
                if poisonCause != nil { throw error }
                if case PoolError.poolFull = error { return }
            }
        }
    }

    // MARK: - Paged refcounts (ARCHITECTURE §5 step 3)

    /// The stored words of refcount leaf `leaf` (``BlockIDs/Loader``): zeros while the
    /// counts are being derived from the maps, else ``readStoredRefcountLeaf(_:)``.
    func storedRefcountWords(_ leaf: Int) throws -> [UInt64] {
        derivingCounts ? [] : try readStoredRefcountLeaf(leaf)
    }

    /// Refcount leaf `leaf` as the refcount tree holds it: the words of a leaf a
    /// checkpoint is writing (or compaction moved), else its page, checked against P-1 and
    /// C-9; nothing (zeros) where the tree has no leaf. A leaf that cannot be read or
    /// fails its checks sets ``refcountLeafDamaged`` and throws.
    func readStoredRefcountLeaf(_ leaf: Int) throws -> [UInt64] {
        let slot = UInt64(leaf) * UInt64(PageLayout.wordCapacity)
        guard let (node, _) = refcountTree.leaf(containing: slot) else { return [] }
        do {
            let words = node.words.isEmpty ? try readPage(node.disk, kind: .refcounts, level: 0) : node.words
            if let problem = BlockIDs.storedLeafProblem(leaf: UInt64(leaf), words: words, limit: ids.limit) {
                throw PoolError.corrupt(structure: "refcount page", byteOffset: node.disk.byteOffset, detail: problem)
            }
            return words
        } catch let error as PoolError {
            switch error {
            case .io, .corrupt: refcountLeafDamaged = true
            default: break
            }
            throw error
        }
    }

    /// How many map leaves name block `id` (its refcount leaf read if needed).
    func refcount(_ id: UInt64) throws -> UInt32 { try ids.refcount(id, load: storedRefcountWords) }

    /// Reads the refcount leaves of `blockIDs` and keeps them resident until the current
    /// journaled change is applied (``journalAndApply(_:)`` unpins): called before a
    /// record is journaled with every id its `apply` changes, so a damaged leaf refuses
    /// the change with nothing changed instead of failing `apply`.
    func pinRefcounts(_ blockIDs: some Sequence<UInt64>) throws {
        for id in blockIDs where id != 0 { try ids.pin(id, load: storedRefcountWords) }
    }

    /// ``pinRefcounts(_:)`` for a write of blocks at `indexes` of `map` after unmapping
    /// `unmapRanges`, mirroring what `apply` changes: the old block at each index, every
    /// block of a leaf that is copied because a node on its path is shared, and the
    /// blocks an unmapped range releases (``pinRefcounts(unmapping:in:)``).
    func pinRefcounts(writing indexes: some Sequence<UInt64>, unmapping unmapRanges: [Range<UInt64>], in map: Tree) throws {
        for range in unmapRanges { try pinRefcounts(unmapping: range, in: map) }
        var lastLeaf: ObjectIdentifier? = nil
        for index in indexes where index < map.capacity {
            guard var node = map.root else { return }
            var shared = node.parentCount > 1
            var remainder = index
            var missing = false
            while node.level > 0 {
                let span = map.span(level: node.level)
                guard let child = node.children[Int(remainder / span)] else { missing = true; break }
                remainder %= span
                node = child
                shared = shared || node.parentCount > 1
            }
            if missing { continue }
            let words = try leafWords(node)
            if shared {
                if lastLeaf != ObjectIdentifier(node) { try pinRefcounts(words) }
                lastLeaf = ObjectIdentifier(node)
            } else {
                try pinRefcounts(CollectionOfOne(words[Int(remainder)]))
            }
        }
    }

    /// ``pinRefcounts(_:)`` for unmapping `range` of `map` (``mapUnmap``): a node the
    /// range covers whole is released, which drops every block of the leaves under it
    /// that had no other parent; a node it covers in part is copied when shared (a leaf
    /// copy retains all its blocks) and the blocks in the range are released.
    func pinRefcounts(unmapping range: Range<UInt64>, in map: Tree) throws {
        func released(_ node: TreeNode) throws {
            // Released whole (its last parent dropped): every leaf below with no other parent.
            if node.level == 0 { try pinRefcounts(try leafWords(node)); return }
            for child in node.children { if let child, child.parentCount == 1 { try released(child) } }
        }
        func visit(_ node: TreeNode, base: UInt64, sharedAbove: Bool) throws {
            let span = node.level == 0 ? UInt64(PageLayout.mapLeafFanout) : map.span(level: node.level) * UInt64(PageLayout.interiorFanout)
            let end = base + span
            guard range.lowerBound < end, base < range.upperBound else { return }
            let shared = sharedAbove || node.parentCount > 1
            if range.lowerBound <= base && end <= range.upperBound {
                if !shared { try released(node) }
                return
            }
            if node.level == 0 {
                let words = try leafWords(node)
                if shared {
                    try pinRefcounts(words)
                } else {
                    let lower = Int(max(range.lowerBound, base) - base), upper = Int(min(range.upperBound, end) - base)
                    try pinRefcounts(words[lower..<upper])
                }
                return
            }
            let childSpan = map.span(level: node.level)
            for (i, child) in node.children.enumerated() {
                if let child { try visit(child, base: base + UInt64(i) * childSpan, sharedAbove: shared) }
            }
        }
        if let root = map.root { try visit(root, base: 0, sharedAbove: false) }
    }

    /// Rebuilds every count from the maps (``deriveRefcounts()``) after a refcount leaf
    /// was found damaged at a point where nothing is half changed (before a record is
    /// journaled): the next checkpoint writes the leaves whose stored counts differ, the
    /// damaged ones among them (FORMAT §5.4: counts are derived data, nothing is lost).
    /// Read-only, the rebuilt counts stay in memory.
    func rebuildRefcountsFromMaps() throws {
        try exclusively { _ = try deriveRefcounts(unusableTree: false) }
        liveRefcountRebuildCount += 1
        refcountLeafDamaged = false
    }

    /// Runs `body` (which reads and pins refcount leaves before a change is journaled);
    /// when it meets a damaged refcount leaf, rebuilds the counts from the maps and runs
    /// it once more.
    func withRefcountRepair<T>(_ body: () throws -> T) throws -> T {
        refcountLeafDamaged = false
        do {
            return try body()
        } catch let error as PoolError where refcountLeafDamaged {
            switch error {
            case .io, .corrupt: break
            default: throw error
            }
            try rebuildRefcountsFromMaps()
            return try body()
        }
    }

    /// Replaces ``ids`` with counts derived from every map leaf (each unique leaf once,
    /// in file order), keeping the sweep's cursor and high-water mark, then compares them
    /// with the stored tree leaf by leaf and marks the leaves that differ (or cannot be
    /// read) changed, so the next checkpoint writes exactly those. `unusableTree`: the
    /// tree is being replaced by an empty one (open found an interior page damaged), so
    /// every leaf holding a count is written and none is read. Returns the leaves marked.
    @discardableResult
    func deriveRefcounts(unusableTree: Bool) throws -> Int {
        let old = ids
        let fresh = BlockIDs(limit: old.limit, liveCount: 0, budgetLeafCount: refcountBudgetLeafCount)
        fresh.continueSweep(from: old)
        derivingCounts = true
        defer { derivingCounts = false }
        ids = fresh
        var seen = Set<ObjectIdentifier>()
        var leaves: [TreeNode] = []
        func collect(_ node: TreeNode) {
            guard seen.insert(ObjectIdentifier(node)).inserted else { return }
            if node.level == 0 { leaves.append(node); return }
            for child in node.children { if let child { collect(child) } }
        }
        for map in allMaps { if let root = map.root { collect(root) } }
        leaves.sort { $0.disk.byteOffset < $1.disk.byteOffset }
        do {
            for node in leaves {
                for id in try leafWords(node) where id != 0 { try fresh.retain(id, load: storedRefcountWords) }
            }
        } catch {
            ids = old
            throw error
        }
        // Every leaf holding a derived count is changed, hence resident, until compared
        // below: a clean one could be dropped and read back as zeros (the loader gives
        // zeros while deriving), which lost derived counts with a small budget (the
        // crash simulation's --long run with a one-page cache found it).
        if unusableTree { return fresh.changedLeafCount }
        var differing = 0
        for leaf in 0..<BlockIDs.leafCount(fresh.limit) {
            let stored: [UInt64]?
            do {
                stored = try readStoredRefcountLeaf(leaf)
            } catch let error as PoolError {
                switch error {
                case .io, .corrupt: stored = nil
                default: throw error
                }
            }
            let words = stored.map { $0.isEmpty ? [UInt64](repeating: 0, count: PageLayout.wordCapacity) : $0 }
            if fresh.isChanged(leaf: leaf) {
                // Derived counts (resident): kept for the checkpoint only where they differ.
                if let words, try !fresh.differs(leaf: leaf, from: words, load: storedRefcountWords) {
                    fresh.clearChanged(leaf: leaf)
                } else {
                    differing += 1
                }
            } else if words?.contains(where: { $0 != 0 }) ?? true {
                // No map names an id of it, but the stored leaf counts some (or cannot be
                // read): a leaf of zeros is written.
                try fresh.markChanged(leaf: leaf, load: storedRefcountWords)
                differing += 1
            }
        }
        fresh.unpinAll()
        return differing
    }

    /// One fewer leaf names block `id`; at zero the block is free and its space dead.
    func dropBlockReference(_ id: UInt64) throws {
        guard let freed = try ids.release(id, load: storedRefcountWords) else {
            throw PoolError.corrupt(structure: "refcount page", byteOffset: refcountTree.root?.disk.byteOffset ?? 0,
                                    detail: "block id \(id) is named by a map leaf being released, but its stored count is zero (run verify --repair: it rebuilds the counts from the maps)")
        }
        if freed {
            try removeLiveData(of: id, at: try blockLocation(id))
        }
    }

    // MARK: - Generic descent

    /// Grows `tree` until it addresses `slotCount` slots: the old root becomes child 0 of
    /// a new root (its parent count is unchanged: it changes parent, not gains one).
    func grow(_ tree: inout Tree, toCover slotCount: UInt64) {
        while tree.capacity < slotCount {
            if let old = tree.root {
                let root = newNode(kind: tree.kind, level: tree.height)
                root.children[0] = old
                tree.root = root
            }
            tree.height += 1
        }
    }

    /// Returns the leaf holding `slot`, made unique and dirty along the whole path, creating
    /// missing nodes. `slot` must be below the tree's capacity.
    func leafForWriting(_ tree: inout Tree, slot: UInt64) throws -> (leaf: TreeNode, index: Int) {
        precondition(slot < tree.capacity, "slot \(slot) beyond tree capacity \(tree.capacity)")
        var node = tree.root ?? newNode(kind: tree.kind, level: tree.height - 1)
        if tree.root != nil {
            try makeResident(node, firstSlot: 0)
            try makeUnique(&node, kind: tree.kind)
        }
        tree.root = node
        var remainder = slot
        while node.level > 0 {
            let span = tree.span(level: node.level)
            let childIndex = Int(remainder / span)
            remainder %= span
            var child = node.children[childIndex] ?? newNode(kind: tree.kind, level: node.level - 1)
            if node.children[childIndex] != nil {
                try makeResident(child, firstSlot: slot - remainder)
                try makeUnique(&child, kind: tree.kind)
            }
            node.children[childIndex] = child
            node = child
        }
        return (node, Int(remainder))
    }

    /// True when a referenced block's entry names a block that can exist: stored bytes
    /// within one block, inside one segment (open and freeing check the same).
    func isValidEntry(_ location: BlockLocation) -> Bool {
        location.storedByteCount > 0 && location.storedByteCount <= geometry.blockByteCount
            && geometry.isValidExtent(byteOffset: location.byteOffset, byteCount: location.allocatedByteCount)
    }

    /// Reads an evicted leaf (map or block table) back before it is changed; making it
    /// dirty right after pins it (``PageCache``).
    ///
    /// `firstSlot`, the first id of a block-table leaf about to take a new id: when its
    /// page cannot be read or fails its checks but no id in it is referenced, its bytes
    /// do not matter (FORMAT §5.3), so it becomes an empty leaf instead of failing the
    /// write; the copy-on-write that follows releases the damaged page like any other.
    /// (A lazy open does not read such a leaf, so its damage first shows here or in
    /// `verify`, which reports it as a warning.)
    func makeResident(_ node: TreeNode, firstSlot: UInt64? = nil) throws {
        // Refcount leaves hold no words between checkpoints: ``ids`` holds the counts,
        // and the checkpoint fills the words of the leaves it writes.
        guard node.level == 0 && node.words.isEmpty && node.kind != .refcounts else { return }
        guard let firstSlot, node.kind == .blockTable else {
            _ = try leafWords(node)
            return
        }
        let range = firstSlot..<firstSlot + UInt64(PageLayout.blockTableLeafFanout)
        _ = try pageCache.words(of: node) { pointer in
            do {
                return try readPage(pointer, kind: .blockTable, level: 0)
            } catch let error as PoolError where !((try? ids.anyReferenced(in: range, load: storedRefcountWords)) ?? true) {
                switch error {
                case .io, .corrupt:
                    replacedDamagedTableLeafCount += 1
                    return TreeNode(kind: .blockTable, level: 0).words
                default:
                    throw error
                }
            }
        }
    }

    /// The leaf holding `slot`, or nil when that part of the tree is empty.
    func leafForReading(_ tree: Tree, slot: UInt64) -> (leaf: TreeNode, index: Int)? {
        tree.leaf(containing: slot)
    }

    // MARK: - Volume maps

    /// Mapped slots of `tree` in `range`, walking only the subtrees that overlap it.
    func mappedSlotCount(_ tree: Tree, in range: Range<UInt64>) throws -> UInt64 {
        func count(_ node: TreeNode, base: UInt64) throws -> UInt64 {
            if node.level == 0 {
                var total: UInt64 = 0
                for (i, id) in try leafWords(node).enumerated() where id != 0 && range.contains(base + UInt64(i)) { total += 1 }
                return total
            }
            let span = tree.span(level: node.level)
            var total: UInt64 = 0
            for (i, child) in node.children.enumerated() {
                guard let child else { continue }
                let start = base + UInt64(i) * span
                if start + span <= range.lowerBound || start >= range.upperBound { continue }
                total += try count(child, base: start)
            }
            return total
        }
        guard let root = tree.root, !range.isEmpty else { return 0 }
        return try count(root, base: 0)
    }

    func mapLookup(_ tree: Tree, blockIndex: UInt64) throws -> UInt64 {
        guard let (leaf, index) = leafForReading(tree, slot: blockIndex) else { return 0 }
        return try leafWords(leaf)[index]
    }

    /// Unmaps logical blocks in `range`. Whole subtrees inside the range are released
    /// without being read or copied; only the two boundary paths are made unique.
    func mapUnmap(_ tree: inout Tree, range: Range<UInt64>) throws {
        let range = range.clamped(to: 0..<tree.capacity)
        guard !range.isEmpty, tree.root != nil else { return }
        if range == 0..<tree.capacity, let root = tree.root {
            try release(root, kind: .map)
            tree.root = nil
            return
        }
        guard var root = tree.root else { return }
        try makeUnique(&root, kind: .map)
        tree.root = root
        try unmap(root, base: 0, range: range, tree: tree)
    }

    private func unmap(_ node: TreeNode, base: UInt64, range: Range<UInt64>, tree: Tree) throws {
        if node.level == 0 {
            for slot in range {
                let index = Int(slot - base)
                let old = node.words[index]
                if old != 0 {
                    node.words[index] = 0
                    try dropBlockReference(old)
                }
            }
            return
        }
        let span = tree.span(level: node.level)
        let first = Int((range.lowerBound - base) / span)
        let last = Int((range.upperBound - 1 - base) / span)
        for childIndex in first...last {
            guard var child = node.children[childIndex] else { continue }
            let childBase = base + UInt64(childIndex) * span
            let childRange = childBase..<(childBase + span)
            let overlap = range.clamped(to: childRange)
            if overlap == childRange {
                try release(child, kind: .map)
                node.children[childIndex] = nil
            } else {
                try makeUnique(&child, kind: .map)
                node.children[childIndex] = child
                try unmap(child, base: childBase, range: overlap, tree: tree)
            }
        }
    }

    /// Calls `body` with every mapped (blockIndex, blockID) in ascending order.
    func forEachMapped(_ tree: Tree, _ body: (UInt64, UInt64) -> Void) throws {
        guard let root = tree.root else { return }
        func walk(_ node: TreeNode, base: UInt64) throws {
            if node.level == 0 {
                for (i, id) in try leafWords(node).enumerated() where id != 0 { body(base + UInt64(i), id) }
                return
            }
            let span = tree.span(level: node.level)
            for (i, child) in node.children.enumerated() {
                if let child { try walk(child, base: base + UInt64(i) * span) }
            }
        }
        try walk(root, base: 0)
    }

    // MARK: - Block table

    /// The location of referenced block `id`: the one record of where a block lies.
    /// Leaves are read on first use, not checked entry by entry at open (COMMIT §4 step
    /// 4), so an entry that names no possible block (a page that passed its checksums
    /// yet holds nonsense) is `corrupt(block-table page)` here, before any caller turns
    /// it into a segment.
    func blockLocation(_ id: UInt64) throws -> BlockLocation {
        guard let (leaf, index) = leafForReading(blockTable, slot: id) else { throw invalidEntry(id, .free, page: nil) }
        let location = BlockTableCursor.entry(try tableLeafWords(leaf), index)
        guard isValidEntry(location) else { throw invalidEntry(id, location, page: leaf.disk.byteOffset) }
        return location
    }

    /// Takes block `id`'s bytes at `location` (from ``blockLocation(_:)``, so valid) out
    /// of its segment's live data. A segment that holds less means the stored usage a
    /// lazy open took is wrong (``SegmentSpace/removeData(_:at:)``): `corrupt`, not a trap.
    func removeLiveData(of id: UInt64, at location: BlockLocation) throws {
        guard !space.removeData(location.allocatedByteCount, at: location.byteOffset) else { return }
        let s = segment(of: location.byteOffset)
        throw PoolError.corrupt(structure: "checkpoint", byteOffset: superblock.checkpointByteOffset,
                                detail: "segment \(s) holds \(dataLiveByteCounts[s]) live data bytes by the stored usage, fewer than the \(location.allocatedByteCount) block id \(id) releases: the checkpoint's segment usage is wrong (verify --repair rebuilds it)")
    }

    /// The error for a referenced id whose entry names no possible block (`page` nil: the
    /// table has no leaf for it).
    func invalidEntry(_ id: UInt64, _ location: BlockLocation, page: UInt64?) -> PoolError {
        guard let page else {
            return .corrupt(structure: "block table", byteOffset: superblock.checkpointByteOffset,
                            detail: "block id \(id) is referenced but the block table has no leaf for it")
        }
        return .corrupt(structure: "block-table page", byteOffset: page,
                        detail: "block id \(id) is referenced but its entry (offset \(location.byteOffset), \(location.storedByteCount) bytes) is invalid")
    }

    /// The words of block-table leaf `leaf`, read from its page through the cache when
    /// they are not resident. Safe under the shared lock (``PageCache``).
    func tableLeafWords(_ leaf: TreeNode) throws -> [UInt64] {
        try pageCache.words(of: leaf) { pointer in try readPage(pointer, kind: .blockTable, level: 0) }
    }

    /// The words of map or block-table leaf `leaf`, read from its page through the cache
    /// when they are not resident (open reads no leaf: ARCHITECTURE §5 step 2). A map
    /// leaf read back is checked to name only ids below the limit: every later use
    /// (a lookup, a release, the retains of a copy) indexes by them. Safe under the
    /// shared lock (``PageCache``).
    func leafWords(_ leaf: TreeNode) throws -> [UInt64] {
        guard leaf.kind == .map else { return try tableLeafWords(leaf) }
        return try pageCache.words(of: leaf) { pointer in try readMapLeaf(pointer) }
    }

    /// Reads map leaf page `pointer` (P-1) and checks its ids against the limit.
    func readMapLeaf(_ pointer: PagePointer) throws -> [UInt64] {
        let words = try readPage(pointer, kind: .map, level: 0)
        let limit = ids.limit
        if let id = words.first(where: { $0 >= limit }) {
            throw PoolError.corrupt(structure: "map page", byteOffset: pointer.byteOffset,
                                    detail: "names block id \(id), beyond the block id limit \(limit)")
        }
        return words
    }

    /// Reads and checks the page `pointer` names (P-1: the trailer and the parent's
    /// checksum must both match).
    func readPage(_ pointer: PagePointer, kind: PageKind, level: Int) throws -> [UInt64] {
        let name = kind.pageName
        guard geometry.isValidExtent(byteOffset: pointer.byteOffset, byteCount: UInt64(PoolGeometry.pageByteCount)) else {
            throw PoolError.corrupt(structure: name, byteOffset: pointer.byteOffset, detail: "page pointer is outside every segment")
        }
        let bytes = try device.read(byteCount: PoolGeometry.pageByteCount, at: pointer.byteOffset)
        do {
            return try PageLayout.decode(bytes, kind: kind, level: level, expectedChecksum: pointer.checksum,
                                         salt: salt, byteOffset: pointer.byteOffset)
        } catch {
            throw PoolError(error)
        }
    }

    /// Calls `body` with every block-table entry that lies in an existing leaf, in id
    /// order, without a tree walk per id. `onlyReferenced`: leaves that hold no
    /// referenced id are skipped unread (their bytes do not matter, FORMAT §5.3, so one
    /// that is damaged or unreadable is no error here).
    func forEachBlockEntry(onlyReferenced: Bool = false, _ body: (UInt64, BlockLocation) throws -> Void) throws {
        guard let root = blockTable.root else { return }
        let fanout = UInt64(PageLayout.blockTableLeafFanout)
        func walk(_ node: TreeNode, base: UInt64) throws {
            if node.level == 0 {
                if onlyReferenced, try !ids.anyReferenced(in: base..<base + fanout, load: storedRefcountWords) { return }
                let words = try tableLeafWords(node)
                for slot in 0..<PageLayout.blockTableLeafFanout {
                    let id = base + UInt64(slot), location = BlockTableCursor.entry(words, slot)
                    if onlyReferenced, try refcount(id) > 0, !isValidEntry(location) {
                        throw invalidEntry(id, location, page: node.disk.byteOffset)
                    }
                    try body(id, location)
                }
                return
            }
            let span = blockTable.span(level: node.level)
            for (i, child) in node.children.enumerated() {
                if let child { try walk(child, base: base + UInt64(i) * span) }
            }
        }
        try walk(root, base: 0)
    }

    /// Calls `body` with every live block (nonzero refcount) and its location, in id order.
    func forEachLiveBlock(_ body: (UInt64, BlockLocation) throws -> Void) throws {
        try forEachBlockEntry(onlyReferenced: true) { id, location in
            if try refcount(id) > 0 { try body(id, location) }
        }
    }

    func setBlockLocation(_ id: UInt64, _ location: BlockLocation) throws {
        grow(&blockTable, toCover: id + 1)
        let (leaf, index) = try leafForWriting(&blockTable, slot: id)
        storeBlockLocation(id, location, leaf: leaf, index: index)
    }

    /// Writes `location` into slot `index` of the (unique, dirty) block-table leaf.
    func storeBlockLocation(_ id: UInt64, _ location: BlockLocation, leaf: TreeNode, index: Int) {
        let w = index * 3
        leaf.words[w] = location.byteOffset
        leaf.words[w + 1] = UInt64(location.storedByteCount) | UInt64(location.flags) << 32
        leaf.words[w + 2] = location.checksum
    }

    /// Ids the block table keeps beyond the live ones (``BlockIDs/idSpaceLimit(forAllocating:)``).
    func idSpaceLimit(forAllocating count: Int) -> UInt64 { ids.idSpaceLimit(forAllocating: count) }

    /// Most ids one write reserves: the blocks one atomic unit can touch.
    static func idsPerWriteMax(blockByteCount: Int) -> Int { atomicUnitByteCount / blockByteCount + 1 }

    /// The largest blockIDLimit a checkpoint whose block table has `blockTableLeafCount`
    /// leaf pages can hold (FORMAT C-6). The limit only grows in ``reserveBlockIDs(_:)``,
    /// to at most ``idSpaceLimit(forAllocating:)`` with live ≤ ids with an entry, and
    /// every id that ever had an entry keeps its leaf (block-table pages are never
    /// released), so live ≤ leaves × fanout at every checkpoint after the reserve.
    static func blockIDLimitMax(blockTableLeafCount: Int, blockByteCount: Int) -> UInt64 {
        let batch = UInt64(idsPerWriteMax(blockByteCount: blockByteCount))
        let live = UInt64(blockTableLeafCount) * UInt64(PageLayout.blockTableLeafFanout) + batch
        return live + live / 4 + 64 + batch
    }

    /// Grows the id space so `count` allocations find free ids (call before a batch).
    func reserveBlockIDs(_ count: Int) {
        ids.reserve(forAllocating: count)
        // The table's height always covers the id space (checkpoint invariant C-4).
        grow(&blockTable, toCover: blockIDLimit)
    }

    /// The next free block id (``BlockIDs/allocate()``); the caller reserved the batch
    /// with ``reserveBlockIDs(_:)``.
    func allocateBlockID() throws -> UInt64 { try ids.allocate(load: storedRefcountWords) }

    /// Pages that writing the leaf slots `slots` of `tree` would dirty or create, computed
    /// without changing anything (admission runs before any change). A clean node on the
    /// path becomes dirty; a shared node, and everything below it, is copied; a missing
    /// node is created. Counting each node once makes this exact for existing nodes and
    /// an upper bound for missing ones.
    func pagesToDirty(_ tree: Tree, slots: some Sequence<UInt64>) -> Int {
        pageCounts(tree, slots: slots).written
    }

    /// Like ``pagesToDirty(_:slots:)``, also counting the pages that are net new: created
    /// or copied nodes (a clean node made dirty replaces its own old page).
    func pageCounts(_ tree: Tree, slots: some Sequence<UInt64>) -> (written: Int, added: Int) {
        var added = 0
        let leafFanout = UInt64(PageLayout.fanout(kind: tree.kind, level: 0))
        var seenLeaves = Set<UInt64>()
        var seenNodes = Set<ObjectIdentifier>()
        var count = 0
        var maxSlot: UInt64 = 0
        for slot in slots {
            maxSlot = max(maxSlot, slot)
            guard seenLeaves.insert(slot / leafFanout).inserted else { continue }
            guard slot < tree.capacity else {
                count += PageLayout.height(kind: tree.kind, coveringSlotCount: slot + 1)
                added += PageLayout.height(kind: tree.kind, coveringSlotCount: slot + 1)
                continue
            }
            var node = tree.root
            var remainder = slot
            var copying = false
            var level = tree.height - 1
            while true {
                guard let current = node else {
                    count += level + 1
                    added += level + 1
                    break
                }
                if current.parentCount > 1 { copying = true }
                if copying || !current.isDirty {
                    if seenNodes.insert(ObjectIdentifier(current)).inserted {
                        count += 1
                        if copying { added += 1 }
                    }
                }
                if level == 0 { break }
                let span = tree.span(level: level)
                node = current.children[Int(remainder / span)]
                remainder %= span
                level -= 1
            }
        }
        if maxSlot >= tree.capacity {
            // Growing adds one interior root per level.
            let growth = PageLayout.height(kind: tree.kind, coveringSlotCount: maxSlot + 1) - tree.height
            count += growth
            added += growth
        }
        return (count, added)
    }

    /// Pages unmapping `ranges` of `map` writes at the next checkpoint and how many of
    /// them are copies (pages shared with another map, copied on write): only the two
    /// boundary paths of each range change (a subtree wholly inside a range is dropped
    /// by clearing its parent's pointer), and an unmapped path changes nothing. So a
    /// discard on a volume that owns its pages adds no page, and a full pool still
    /// accepts it (Specs/COMMIT.md §5.1).
    func unmapPageCounts(_ map: Tree, ranges: [Range<UInt64>]) -> (written: Int, added: Int) {
        var written = 0, added = 0
        var seen = Set<ObjectIdentifier>()
        for range in ranges where !range.isEmpty {
            for slot in Set([range.lowerBound, range.upperBound - 1]) where slot < map.capacity {
                var node = map.root
                var remainder = slot
                var level = map.height - 1
                var copying = false
                while let current = node {
                    if current.parentCount > 1 { copying = true }
                    if (copying || !current.isDirty) && seen.insert(ObjectIdentifier(current)).inserted {
                        written += 1
                        if copying { added += 1 }
                    }
                    if level == 0 { break }
                    let span = map.span(level: level)
                    node = current.children[Int(remainder / span)]
                    remainder %= span
                    level -= 1
                }
            }
        }
        return (written, added)
    }

    /// The ids the next `count` calls of ``allocateBlockID()`` will return after
    /// ``reserveBlockIDs(_:)`` (computed without changing anything).
    func peekBlockIDs(_ count: Int) throws -> [UInt64] { try ids.peek(count, load: storedRefcountWords) }

    /// Pages a write of new blocks at `indexes` of `map` can dirty: map paths plus the
    /// block-table paths of the ids it will take.
    /// Block-table pages are not counted as added: the logical rule reserves the whole
    /// table for the id space up front (``blockTableReservedPageCount(forAllocating:)``).
    func pagesForWrite(_ map: Tree, indexes: [UInt64]) throws -> (written: Int, added: Int) {
        let m = pageCounts(map, slots: indexes), b = pagesToDirty(blockTable, slots: try peekBlockIDs(indexes.count))
        return (m.written + b, m.added)
    }

    /// Leaves and interior pages of a refcount tree with every leaf present for the id
    /// space after one more write's allocations, at the height that covers it (or the
    /// tree's own, which never shrinks).
    var refcountTreeBound: (leaves: Int, interior: Int) {
        let limit = idSpaceLimit(forAllocating: Engine.idsPerWriteMax(blockByteCount: blockByteCount))
        let leaves = BlockIDs.leafCount(limit)
        let height = max(refcountTree.height, CheckpointRoot.refcountHeight(coveringBlockIDLimit: limit))
        var interior = 0
        var level = leaves
        for _ in 1..<height {
            level = max(1, (level + PageLayout.interiorFanout - 1) / PageLayout.interiorFanout)
            interior += level
        }
        return (leaves, interior)
    }

    /// Every page of that tree: the standing reservation of rule A-1. A delete, a discard
    /// or the copy of a shared map leaf changes counts all over the id space, and a
    /// delete must fit a full pool, so A-1 always keeps room for the whole tree to be
    /// written once more beside the one the durable checkpoint holds (about 0.1% of the
    /// data with 4 KiB blocks, 0.8% with 512-byte blocks).
    var refcountPageBound: Int {
        let bound = refcountTreeBound
        return bound.leaves + bound.interior
    }

    /// Refcount pages the next checkpoint writes for the counts changed so far: the
    /// changed leaves and, at most, every interior page.
    var refcountPendingPageCount: Int { ids.changedLeafCount + refcountTreeBound.interior }

    /// Refcount leaves a change of `countChanges` counts can add to those (each count
    /// is in one leaf): rule A-2 prices these per operation.
    func refcountPages(forCountChanges countChanges: Int) -> Int {
        max(0, min(countChanges, refcountTreeBound.leaves - ids.changedLeafCount))
    }

    /// Pages the next checkpoint writes for what changed so far: the dirty pages and the
    /// refcount pages of the changed counts.
    var checkpointPageBound: Int { dirtyPageCount + refcountPendingPageCount }

    /// Pages a fully populated block table for the id space after allocating `count` more
    /// ids would have beyond the nodes it has now. The id space is bounded (live ids plus
    /// a quarter), so reserving this keeps overwrites from ever needing new table pages.
    func blockTableReservedPageCount(forAllocating count: Int) -> Int {
        var slots = Int(idSpaceLimit(forAllocating: count))
        var pages = 0
        var fanout = PageLayout.blockTableLeafFanout
        while true {
            let level = (slots + fanout - 1) / fanout
            pages += level
            if level <= 1 { break }
            slots = level
            fanout = PageLayout.interiorFanout
        }
        return max(0, pages - blockTableNodeCount)
    }
}
