import LogPoolFormat
import Synchronization

/// Map and block-table leaf pages in bounded memory (issue 11, Specs/ARCHITECTURE.md §5):
/// a leaf's words are read from its page on first use and dropped again (CLOCK order)
/// when more clean leaves are resident than the budget allows. A dirty leaf is pinned: its
/// words are the only copy until a checkpoint writes them; the checkpoint then hands it
/// to the cache (``admit(_:)``) and it can be evicted like any page read from disk.
///
/// Readers under the shared pool lock load and evict concurrently, so every access to a
/// leaf's words outside the exclusive lock goes through ``words(of:load:)``, which
/// returns the words as a value: a reader keeps what it got even if another reader
/// evicts the node right after. Changes to a leaf's words happen only under the
/// exclusive lock (no reader runs), on a dirty, hence pinned, leaf.
///
/// The mutex guards the ring and, by convention (``TreeNode``), the fields of the nodes
/// in it that readers change.
final class PageCache: Sendable {
    /// Clean leaves kept resident at most (at least one).
    let budgetPageCount: Int

    private struct State {
        /// Resident leaves that can be evicted once clean, in CLOCK order.
        var ring: [TreeNode] = []
        var hand = 0
        /// Pages installed and words dropped, since open (for `bench` and tests). A read
        /// that lost the race to install its leaf (two readers missing it at once) is
        /// not counted.
        var loadCount = 0
        var evictionCount = 0
        /// Loads of a leaf that was read before and evicted since.
        var rereadCount = 0

        /// Drops clean, unreferenced leaves until no more than `limit` are resident.
        /// Dirty leaves are skipped; one sweep of twice the ring gives every referenced
        /// leaf its second chance, so this ends even when every leaf is dirty.
        mutating func evict(keeping limit: Int) {
            var steps = 2 * ring.count
            while ring.count > limit && steps > 0 {
                steps -= 1
                if hand >= ring.count { hand = 0 }
                let node = ring[hand]
                if node.released {
                    node.inCache = false
                    ring.swapAt(hand, ring.count - 1)
                    ring.removeLast()
                    continue
                }
                if node.isDirty { hand += 1; continue }
                if node.referenced { node.referenced = false; hand += 1; continue }
                node.words = []
                node.inCache = false
                node.wasEvicted = true
                evictionCount += 1
                ring.swapAt(hand, ring.count - 1)
                ring.removeLast()
            }
        }
    }
    private let state = Mutex(State())

    var loadCount: Int { state.withLock { $0.loadCount } }
    var evictionCount: Int { state.withLock { $0.evictionCount } }
    var rereadCount: Int { state.withLock { $0.rereadCount } }

    init(budgetByteCount: Int) {
        budgetPageCount = max(1, budgetByteCount / PoolGeometry.pageByteCount)
    }

    /// The words of map or block-table leaf `node`, read with `load` from its page when they
    /// were evicted (or never read since open).
    ///
    /// The page is read outside the mutex, so other readers' hits do not wait for this
    /// one's I/O; two readers missing the same leaf at once both read it, and the second
    /// to finish uses the words the first installed. (`node.disk` does not change while
    /// readers run: only a writer holding the pool's lock exclusively changes it.) No
    /// error is thrown through the mutex's closure.
    func words(of node: TreeNode, load: (PagePointer) throws -> [UInt64]) throws -> [UInt64] {
        let hit: [UInt64]? = state.withLock { _ in
            guard !node.words.isEmpty else { return nil }
            node.referenced = true
            return node.words
        }
        if let hit { return hit }
        let words = try load(node.disk)
        return state.withLock { state in
            if !node.words.isEmpty {
                node.referenced = true
                return node.words
            }
            if node.wasEvicted { state.rereadCount += 1 }
            // Room first, then the new leaf: it cannot be evicted by its own load, so a
            // writer that loads a leaf to change it still has it resident when it marks
            // it dirty (pinned) right after.
            state.evict(keeping: budgetPageCount - 1)
            node.words = words
            node.referenced = true
            node.inCache = true
            state.ring.append(node)
            state.loadCount += 1
            return words
        }
    }

    /// After a checkpoint: the leaves it wrote are clean, so they can be evicted (new
    /// leaves are created dirty and outside the cache; leaves already in it were pinned
    /// while dirty), and the cache is trimmed back to its budget.
    func admit(_ nodes: [TreeNode]) {
        state.withLock { state in
            for node in nodes where !node.inCache && node.level == 0 && !node.isDirty {
                node.inCache = true
                node.referenced = false
                state.ring.append(node)
            }
            state.evict(keeping: budgetPageCount)
        }
    }

    /// `node` left every tree (released): it is dropped at the next sweep whether dirty
    /// or not, and its words now.
    func forget(_ node: TreeNode) {
        state.withLock { _ in
            guard node.inCache else { return }
            node.released = true
            node.words = []
        }
    }

    /// Resident leaves the cache holds, dirty ones included.
    var residentCount: Int { state.withLock { $0.ring.count } }
}
