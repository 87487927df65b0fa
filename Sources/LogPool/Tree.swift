import LogPoolFormat
import Synchronization

/// A node of a copy-on-write tree (a volume map or the block table), kept in memory.
///
/// `parentCount` is the number of parents (volume records or interior nodes) that point at
/// this node. A node with more than one parent is shared between volumes and snapshots and
/// is copied before it is changed (Specs/FORMAT.md §5, "sharing"). `disk` is where the node
/// was last written; `.none` means it is dirty and the next checkpoint writes it.
///
/// A level-1 node that open read keeps its children's page pointers instead of child
/// nodes (`lazyGroup` set) until one of them is first used: open then costs one node per
/// interior page, not one per leaf (ARCHITECTURE §4). ``children`` creates the leaf
/// nodes of every level-1 node at the same place in any tree at once (``LeafGroup``), so
/// a shared leaf gets all its parents together and its `parentCount` is exact from the
/// start.
///
/// Unchecked `Sendable`: nodes move between threads only under the pool's lock (the
/// writer changes them with the read-write lock held exclusively, readers plan under it
/// shared), and the fields readers change under the shared lock (`words`, `inCache`,
/// `referenced`, `released`, `wasEvicted`) only under the ``PageCache``'s mutex; a lazy
/// node's `storedChildren` and `childPointers` only under its group's mutex until
/// `childrenReady` is set (release), and only by the writer after that.
final class TreeNode: @unchecked Sendable {
    let kind: PageKind
    let level: Int
    /// Leaf slots as 8-byte words (map: 1 word per slot; block table: 3; refcounts: two
    /// counts per word). Empty for a leaf that is not resident: map and block-table
    /// leaves are read through the ``PageCache`` (``Engine/leafWords(_:)``), refcount
    /// leaves hold words only while a checkpoint writes them.
    var words: [UInt64]
    /// Interior slots (a lazy node's leaves are created here on first use).
    var children: [TreeNode?] {
        get {
            if lazyGroup != nil { ensureChildren() }
            return storedChildren
        }
        _modify {
            if lazyGroup != nil { ensureChildren() }
            yield &storedChildren
        }
    }
    fileprivate var storedChildren: [TreeNode?]
    /// Set on level-1 nodes read at open: the nodes at the same place whose leaves are
    /// created together.
    let lazyGroup: LeafGroup?
    /// A lazy node's child page pointers, one per slot, until its leaves exist; empty
    /// after.
    fileprivate var childPointers: [PagePointer] = []
    fileprivate let childrenReady: Atomic<Bool>
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
            storedChildren = []
        } else {
            words = []
            storedChildren = [TreeNode?](repeating: nil, count: PageLayout.interiorFanout)
        }
        disk = .none
        parentCount = 1
        lazyGroup = nil
        childrenReady = Atomic(true)
    }

    init(copying other: TreeNode) {
        kind = other.kind
        level = other.level
        words = other.words
        storedChildren = other.children
        disk = .none
        parentCount = 1
        lazyGroup = nil
        childrenReady = Atomic(true)
    }

    init(kind: PageKind, level: Int, words: [UInt64], children: [TreeNode?], disk: PagePointer) {
        self.kind = kind
        self.level = level
        self.words = words
        self.storedChildren = children
        self.disk = disk
        self.parentCount = 1
        lazyGroup = nil
        childrenReady = Atomic(true)
    }

    /// A level-1 node read at open whose leaves are created on first use: `pointers` are
    /// its page's child pointers, already checked to lie inside segments. It joins
    /// `group`, the level-1 nodes at the same place.
    init(lazyLevelOne kind: PageKind, pointers: [PagePointer], disk: PagePointer, group: LeafGroup) {
        self.kind = kind
        level = 1
        words = []
        storedChildren = []
        self.disk = disk
        parentCount = 1
        lazyGroup = group
        childPointers = pointers
        childrenReady = Atomic(false)
        group.adopt(self)
    }

    var isDirty: Bool { disk.isNone }

    @inline(__always)
    private func ensureChildren() {
        if !childrenReady.load(ordering: .acquiring) { lazyGroup?.createLeaves() }
    }

    /// The node's children as they are, without creating any: `.pending` gives a lazy
    /// node's child page pointers. For the walks that need pages, not leaves.
    var childrenSnapshot: ChildrenSnapshot {
        guard let group = lazyGroup, !childrenReady.load(ordering: .acquiring) else { return .ready(storedChildren) }
        return group.snapshot(of: self)
    }

    enum ChildrenSnapshot {
        case ready([TreeNode?])
        case pending([PagePointer])
    }
}

/// The level-1 nodes open read at one place (a kind and a first slot) whose leaves have
/// no nodes yet. A leaf page can be shared only between nodes at the same place and slot
/// (P-4), so creating every member's leaves at once, one node per distinct page with one
/// parent per member naming it, gives each leaf its exact `parentCount`.
///
/// Unchecked `Sendable`: `members` and the members' lazy fields change only under the
/// registry's mutex.
final class LeafGroup: @unchecked Sendable {
    let registry: LeafRegistry
    let kind: PageKind
    /// The first slot the group's nodes cover.
    let base: UInt64
    /// Weak: a member keeps its group (``TreeNode/lazyGroup``), not the other way, so
    /// nodes no tree names any more (a closed engine's) are freed with their group. A
    /// member leaves the trees only through a release or a copy, which create the
    /// group's leaves first, or with its whole engine.
    fileprivate var members: [Weak] = []

    struct Weak {
        weak var node: TreeNode?
    }

    init(registry: LeafRegistry, kind: PageKind, base: UInt64) {
        self.registry = registry
        self.kind = kind
        self.base = base
    }

    /// Open only (one thread): a member joins.
    fileprivate func adopt(_ node: TreeNode) { registry.locked { _ in members.append(Weak(node: node)) } }

    /// The child pointers of each member whose leaves have no nodes yet (open only).
    var pendingPointers: [[PagePointer]] {
        registry.locked { _ in members.compactMap { $0.node.map(\.childPointers) }.filter { !$0.isEmpty } }
    }

    fileprivate func snapshot(of node: TreeNode) -> TreeNode.ChildrenSnapshot {
        registry.locked { _ in node.childrenReady.load(ordering: .relaxed) ? .ready(node.storedChildren) : .pending(node.childPointers) }
    }

    /// Creates the leaves of every member (at most once). `existing`: leaf nodes open
    /// made already (roots of one-level maps), which gain a parent where a member names
    /// them at child 0. A page named at two places, or at one place with two checksums,
    /// breaks P-4: the handle refuses every call from then on, writing no record and no
    /// commit (COMMIT §3.2), and `verify` reports the page.
    func createLeaves(existing: [UInt64: TreeNode] = [:]) {
        registry.locked { state in
            let members = self.members.compactMap(\.node)
            self.members = []
            guard !members.isEmpty else { return }
            let fanout = PageLayout.interiorFanout
            for member in members { member.storedChildren = [TreeNode?](repeating: nil, count: fanout) }
            var made = PagesAtSlot<TreeNode>()
            for i in 0..<fanout {
                made.removeAll()
                for member in members {
                    let pointer = member.childPointers[i]
                    guard !pointer.isNone else { continue }
                    if let leaf = made[pointer.byteOffset] {
                        if leaf.disk.checksum != pointer.checksum {
                            state.problem(kind, pointer.byteOffset, "is named twice at block index \(slotBase(i)) with different checksums")
                        }
                        leaf.parentCount += 1
                        member.storedChildren[i] = leaf
                        continue
                    }
                    let leaf: TreeNode
                    // A leaf root can only be child 0 (growth), with the root's checksum;
                    // named anywhere else it is a second place (P-4), found just below.
                    if i == 0, let root = existing[pointer.byteOffset], root.disk.checksum == pointer.checksum {
                        root.parentCount += 1
                        leaf = root
                    } else {
                        leaf = TreeNode(kind: kind, level: 0, words: [], children: [], disk: pointer)
                        if !state.pages.insert(pointer.byteOffset).inserted {
                            state.problem(kind, pointer.byteOffset, "is named at block index \(slotBase(i)) and at another place: a shared page must cover the same blocks wherever it is reached (P-4)")
                        }
                    }
                    made[pointer.byteOffset] = leaf
                    member.storedChildren[i] = leaf
                }
            }
            for member in members {
                member.childPointers = []
                member.childrenReady.store(true, ordering: .releasing)
            }
            if members.count > 1 { state.sharedGroupCount += 1 }
        }
    }

    private func slotBase(_ index: Int) -> UInt64 {
        base + UInt64(index) * UInt64(PageLayout.fanout(kind: kind, level: 0))
    }
}

/// The distinct pages the members of a group name at one slot: most name one of a few,
/// so a short list is searched first and a dictionary used only past it (many diverged
/// snapshots at one place). Open counts leaf pages with it, ``LeafGroup`` creates them.
struct PagesAtSlot<Value> {
    private var list: [(offset: UInt64, value: Value)] = []
    private var overflow: [UInt64: Value] = [:]
    private static var listCapacity: Int { 16 }

    subscript(offset: UInt64) -> Value? {
        get {
            if let hit = list.first(where: { $0.offset == offset }) { return hit.value }
            return list.count == Self.listCapacity ? overflow[offset] : nil
        }
        set {
            // Only new pages are added (callers look up first).
            guard let newValue else { return }
            if list.count < Self.listCapacity { list.append((offset, newValue)) } else { overflow[offset] = newValue }
        }
    }

    mutating func removeAll() {
        list.removeAll(keepingCapacity: true)
        overflow.removeAll(keepingCapacity: true)
    }
}

/// What the lazily created leaves share: one mutex for every ``LeafGroup`` of an open
/// pool, the pages open read or leaves were created for (a page named at a second place
/// breaks P-4), and the engine's poison, set when that happens.
final class LeafRegistry: Sendable {
    struct State {
        var pages: Set<UInt64>
        /// Groups of more than one node whose leaves were created (shared leaves).
        var sharedGroupCount = 0
        let poison: PoisonState

        mutating func problem(_ kind: PageKind, _ byteOffset: UInt64, _ detail: String) {
            poison.setIfClear("\(kind.pageName) at \(byteOffset) \(detail): this handle refuses further calls (run logpool verify)")
        }
    }

    private let state: Mutex<State>

    init(pages: Set<UInt64>, poison: PoisonState) {
        state = Mutex(State(pages: pages, poison: poison))
    }

    /// Open only: pages read at open (interior pages and leaf roots).
    func addPages(_ pages: some Sequence<UInt64>) {
        state.withLock { state in for page in pages { state.pages.insert(page) } }
    }

    fileprivate func locked<T: Sendable>(_ body: (inout State) -> T) -> T { state.withLock { body(&$0) } }

    /// Groups of more than one node whose leaves were created since open (for the
    /// crash simulation's coverage).
    var sharedGroupCount: Int { state.withLock { $0.sharedGroupCount } }
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
