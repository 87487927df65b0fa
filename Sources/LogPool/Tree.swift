import LogPoolFormat

/// A node of a copy-on-write tree (a volume map or the block table), kept in memory.
///
/// `parentCount` is the number of parents (volume records or interior nodes) that point at
/// this node. A node with more than one parent is shared between volumes and snapshots and
/// is copied before it is changed (Specs/FORMAT.md §5, "sharing"). `disk` is where the node
/// was last written; `.none` means it is dirty and the next checkpoint writes it.
///
/// Unchecked `Sendable`: nodes move between threads only under the pool's lock (the
/// writer changes them with the read-write lock held exclusively, readers plan under it
/// shared), and the fields readers change under the shared lock (`words`, `inCache`,
/// `referenced`, `released`, `wasEvicted`) only under the ``PageCache``'s mutex.
final class TreeNode: @unchecked Sendable {
    let kind: PageKind
    let level: Int
    /// Leaf slots as 8-byte words (map: 1 word per slot; block table: 3; refcounts: two
    /// counts per word). Empty for a leaf that is not resident: map and block-table
    /// leaves are read through the ``PageCache`` (``Engine/leafWords(_:)``), refcount
    /// leaves hold words only while a checkpoint writes them.
    var words: [UInt64]
    /// Interior slots.
    var children: [TreeNode?]
    var disk: PagePointer
    var parentCount: Int
    /// Map and block-table leaves only: in the ``PageCache``'s ring, and used since the
    /// clock hand last passed (changed under the cache's mutex). Such a leaf whose
    /// `words` are empty is not resident: its page is read on next use.
    var inCache = false
    var referenced = false
    /// Left every tree while in the ``PageCache``'s ring: dropped at its next sweep.
    var released = false
    /// Its words were dropped by the cache at least once (a later load is a re-read).
    var wasEvicted = false

    init(kind: PageKind, level: Int) {
        self.kind = kind
        self.level = level
        if level == 0 {
            words = [UInt64](repeating: 0, count: PageLayout.fanout(kind: kind, level: 0) * PageLayout.wordsPerSlot(kind: kind, level: 0))
            children = []
        } else {
            words = []
            children = [TreeNode?](repeating: nil, count: PageLayout.interiorFanout)
        }
        disk = .none
        parentCount = 1
    }

    init(copying other: TreeNode) {
        kind = other.kind
        level = other.level
        words = other.words
        children = other.children
        disk = .none
        parentCount = 1
    }

    init(kind: PageKind, level: Int, words: [UInt64], children: [TreeNode?], disk: PagePointer) {
        self.kind = kind
        self.level = level
        self.words = words
        self.children = children
        self.disk = disk
        self.parentCount = 1
    }

    var isDirty: Bool { disk.isNone }
}

/// One tree: its root and height (1 = the root is a leaf).
struct Tree {
    let kind: PageKind
    var root: TreeNode?
    var height: Int

    /// Leaf slots covered by one child of a node at `level` (level ≥ 1).
    func span(level: Int) -> UInt64 {
        PageLayout.capacity(kind: kind, height: level)
    }

    var capacity: UInt64 { PageLayout.capacity(kind: kind, height: height) }

    /// The leaf holding `slot` and the slot's index in it, or nil when that part of the
    /// tree is empty.
    func leaf(containing slot: UInt64) -> (leaf: TreeNode, index: Int)? {
        guard slot < capacity, var node = root else { return nil }
        var remainder = slot
        while node.level > 0 {
            let span = span(level: node.level)
            guard let child = node.children[Int(remainder / span)] else { return nil }
            remainder %= span
            node = child
        }
        return (node, Int(remainder))
    }
}

/// Looks up a map's slots in increasing order with one tree descent per leaf, not per
/// slot (issue 11: a read of many blocks costs a descent per leaf): the current leaf's
/// words are kept and reused while the slots stay inside it. Leaves come through the
/// engine's ``PageCache`` (read from their page when not resident), so a cursor is safe
/// under the shared lock.
struct MapCursor {
    let engine: Engine
    let tree: Tree
    private var words: [UInt64] = []
    /// Slots [base, base + fanout) are covered by `words` (empty: an unmapped subtree).
    private var base: UInt64 = 1
    private var end: UInt64 = 0
    private let fanout = UInt64(PageLayout.mapLeafFanout)

    init(_ engine: Engine, _ tree: Tree) {
        self.engine = engine
        self.tree = tree
    }

    /// The block id at `slot` (0 = unmapped), descending only when `slot` leaves the
    /// current leaf. A leaf that cannot be read is the error of ``Engine/leafWords(_:)``.
    mutating func id(at slot: UInt64) throws -> UInt64 {
        if slot < base || slot >= end { try descend(to: slot) }
        return words.isEmpty ? 0 : words[Int(slot - base)]
    }

    private mutating func descend(to slot: UInt64) throws {
        base = slot - slot % fanout
        end = base + fanout
        words = []
        if let leaf = tree.leaf(containing: slot)?.leaf { words = try engine.leafWords(leaf) }
    }
}

/// Looks up block-table entries with one tree descent per leaf, like ``MapCursor``: ids
/// written together are allocated together (``BlockIDs/allocate()``), so a read of a run
/// of blocks finds their entries in one or two leaves. Leaves come through the engine's
/// ``PageCache`` (read from their page when not resident).
struct BlockTableCursor {
    let engine: Engine
    private var words: [UInt64] = []
    private var base: UInt64 = 1
    private var end: UInt64 = 0
    private var page: UInt64 = 0
    private let fanout = UInt64(PageLayout.blockTableLeafFanout)

    init(_ engine: Engine) { self.engine = engine }

    /// Referenced block `id`'s entry. An entry that names no possible block, or no leaf
    /// at all, is `corrupt(block-table page)`, as in ``Engine/blockLocation(_:)``:
    /// nothing sizes a read from it.
    mutating func location(of id: UInt64) throws -> BlockLocation {
        if id < base || id >= end {
            base = id - id % fanout
            end = base + fanout
            words = []
            if let leaf = engine.blockTable.leaf(containing: id)?.leaf {
                words = try engine.tableLeafWords(leaf)
                page = leaf.disk.byteOffset
            }
        }
        guard !words.isEmpty else { throw engine.invalidEntry(id, .free, page: nil) }
        let location = Self.entry(words, Int(id - base))
        guard engine.isValidEntry(location) else { throw engine.invalidEntry(id, location, page: page) }
        return location
    }

    /// Entry `index` of a block-table leaf's words (3 words per entry: FORMAT §5).
    @inline(__always)
    static func entry(_ words: [UInt64], _ index: Int) -> BlockLocation {
        let w = index * 3
        let packed = words[w + 1]
        return BlockLocation(byteOffset: words[w], storedByteCount: UInt32(truncatingIfNeeded: packed),
                             flags: UInt32(truncatingIfNeeded: packed >> 32), checksum: words[w + 2])
    }
}
