import LogPoolFormat

enum SegmentState: Equatable {
    /// Holds nothing any durable state references; may be written.
    case free
    /// The segment appends go to.
    case open
    /// Written since it was last free; reused only after a checkpoint finds it empty.
    case used
}

/// The allocator's state: what ``SegmentSpace/place(byteCount:alignment:in:)`` reads and
/// advances. The engine's own copy lives in ``SegmentSpace``; admission's dry runs place
/// extents on copies, so what admission allows is exactly what allocation can do.
struct AllocationPlan {
    /// Dead extents of used segments (or of the open segment below its append point) that
    /// no durable state references, trimmed to whole 4 KiB units.
    var holes: [(byteOffset: UInt64, byteCount: UInt64)]
    var openSegment: Int?
    /// Absolute file offset of the next append in the open segment.
    var appendByteOffset: UInt64
    /// Free segments, the next to open last (highest index first).
    var freeSegments: [Int]
}

/// Where an extent goes.
enum Placement {
    case open(UInt64)
    case hole(UInt64)
    case newSegment(Int, UInt64)
}

/// The pool's segments as space (Specs/COMMIT.md §5): each segment's state and live bytes
/// (data blocks and metadata apart), their totals, and the allocator (free list, open
/// segment, append point, holes). The only owner of these figures: every change goes
/// through a method that keeps the totals equal to the sums and the free list equal to
/// the free states, which four files once kept in step by hand.
struct SegmentSpace {
    let geometry: PoolGeometry
    private(set) var states: [SegmentState]
    /// Sector-rounded stored bytes of every referenced block, per segment.
    private(set) var dataLive: [UInt64]
    /// Pages and root of the durable checkpoint, per segment.
    private(set) var metaLive: [UInt64]
    private(set) var dataLiveTotal: UInt64 = 0
    private(set) var metaLiveTotal: UInt64 = 0
    private(set) var allocator = AllocationPlan(holes: [], openSegment: nil, appendByteOffset: 0, freeSegments: [])
    /// An extent went into a hole since the last sync, so a hole may now start inside a
    /// 4 KiB unit that holds that extent: the next sync trims the holes to whole units.
    private(set) var holesNeedTrim = false

    /// Every segment used (open resets them from the checkpoint, format frees them all).
    init(geometry: PoolGeometry) {
        self.geometry = geometry
        let count = Int(geometry.segmentCount)
        states = [SegmentState](repeating: .used, count: count)
        dataLive = [UInt64](repeating: 0, count: count)
        metaLive = [UInt64](repeating: 0, count: count)
    }

    var count: Int { states.count }
    var freeSegments: [Int] { allocator.freeSegments }
    var openSegment: Int? { allocator.openSegment }
    var appendByteOffset: UInt64 { allocator.appendByteOffset }
    var holes: [(byteOffset: UInt64, byteCount: UInt64)] { allocator.holes }

    func liveByteCount(_ s: Int) -> UInt64 { dataLive[s] + metaLive[s] }

    /// The segment holding `byteOffset`; every location is validated when decoded.
    func segment(of byteOffset: UInt64) -> Int {
        guard let s = geometry.segmentIndex(containing: byteOffset) else {
            preconditionFailure("byte offset \(byteOffset) is outside the data area; every location is validated when decoded")
        }
        return s
    }

    // MARK: Live bytes

    mutating func addData(_ byteCount: UInt64, at byteOffset: UInt64) {
        dataLive[segment(of: byteOffset)] += byteCount
        dataLiveTotal += byteCount
    }

    /// Removes live data from `byteOffset`'s segment. False, with nothing changed, when
    /// the segment holds less: its usage came from a checkpoint root that passed its
    /// checksum yet is wrong (crafted or damaged before it was sealed), which a lazy open
    /// does not check against the leaves (COMMIT §4 step 4); the caller reports it as
    /// corruption instead of trapping.
    mutating func removeData(_ byteCount: UInt64, at byteOffset: UInt64) -> Bool {
        let s = segment(of: byteOffset)
        guard dataLive[s] >= byteCount else { return false }
        dataLive[s] -= byteCount
        dataLiveTotal -= byteCount
        return true
    }

    /// The metadata a checkpoint just committed, per segment.
    mutating func setMetaLive(_ counts: [UInt64]) {
        precondition(counts.count == metaLive.count, "one count per segment")
        metaLive = counts
        metaLiveTotal = counts.reduce(0, +)
    }

    /// Open: the figures rebuilt from the checkpoint. A segment is free exactly when
    /// nothing in it is live (R-1 before replay).
    mutating func load(dataLive data: [UInt64], metaLive meta: [UInt64]) {
        precondition(data.count == states.count && meta.count == states.count, "one count per segment")
        dataLive = data
        metaLive = meta
        dataLiveTotal = data.reduce(0, +)
        metaLiveTotal = meta.reduce(0, +)
        for s in 0..<states.count { states[s] = data[s] + meta[s] == 0 ? .free : .used }
    }

    // MARK: States

    /// A new pool: every segment free.
    mutating func markAllFree() {
        for s in 0..<states.count { states[s] = .free }
        rebuildFreeList()
    }

    /// During replay, a segment a record wrote into is not free. The free list is
    /// rebuilt when replay ends.
    mutating func markWritten(_ byteOffset: UInt64) {
        let s = segment(of: byteOffset)
        if states[s] == .free { states[s] = .used }
    }

    /// After a checkpoint commit: used segments with nothing live become free, and so
    /// does an open segment holding nothing live (a reopen frees it, R-1; keeping it open
    /// counted its written bytes as dead where a reopen counts the segment free); appends
    /// then open a fresh segment.
    mutating func freeEmptySegments(keeping kept: Set<Int> = []) {
        for s in 0..<states.count where states[s] == .used && liveByteCount(s) == 0 && !kept.contains(s) { states[s] = .free }
        if let open = allocator.openSegment, liveByteCount(open) == 0, !kept.contains(open) {
            states[open] = .free
            allocator.openSegment = nil
        }
        rebuildFreeList()
    }

    mutating func rebuildFreeList() {
        allocator.freeSegments = states.indices.reversed().filter { states[$0] == .free }
    }

    /// True when a checkpoint would free at least one segment.
    var hasEmptyUsedSegment: Bool {
        states.indices.contains { states[$0] == .used && liveByteCount($0) == 0 }
    }

    // MARK: Holes

    mutating func setHoles(_ holes: [(byteOffset: UInt64, byteCount: UInt64)]) { allocator.holes = holes }

    /// Holes are valid only against the commit they were computed after.
    mutating func forgetHoles() { allocator.holes.removeAll() }

    /// Compaction's victims: their holes are not to be written, their rest moves.
    mutating func dropHoles(in segments: Set<Int>) {
        let geometry = self.geometry
        allocator.holes.removeAll { segments.contains(geometry.segmentIndex(containing: $0.byteOffset) ?? -1) }
    }

    /// appends resume in segment `s` at the start of its hole `index`, which runs to
    /// the segment's end.
    /// Appends resume in used segment `s` at `byteOffset` (rounded up to 4 KiB), whose
    /// rest to the segment's end no durable state references (the root's stored append
    /// point, FORMAT §6).
    mutating func resume(_ s: Int, at byteOffset: UInt64) {
        let unit = UInt64(PoolGeometry.durableAlignmentByteCount)
        let start = geometry.segmentByteOffset(s)
        let end = start + UInt64(geometry.segmentByteCount)
        let at = max((byteOffset + unit - 1) & ~(unit - 1), start + UInt64(PoolGeometry.segmentHeaderByteCount))
        guard states[s] == .used, at < end else { return }
        allocator.appendByteOffset = at
        states[s] = .open
        allocator.openSegment = s
    }

    mutating func resume(_ s: Int, atHole index: Int) {
        allocator.appendByteOffset = allocator.holes[index].byteOffset
        allocator.holes.remove(at: index)
        states[s] = .open
        allocator.openSegment = s
    }

    // MARK: Allocation

    /// Where an extent of `byteCount` bytes goes, updating `plan` as the allocation would;
    /// nil when it would run dry. Order: the open segment; a new segment (lowest index)
    /// while more than the reserve is free; a hole (first fit); finally a reserve
    /// segment. The one placement rule, shared by allocation and by admission's dry runs
    /// (counting holes in whole units was not: variable compressed extents strand the
    /// tail of each hole they fill, and a pool was poisoned by an extent admission had
    /// allowed).
    func place(byteCount: Int, alignment: Int, in plan: inout AllocationPlan) -> Placement? {
        let align = UInt64(alignment)
        func aligned(_ offset: UInt64) -> UInt64 { (offset + align - 1) & ~(align - 1) }
        if let open = plan.openSegment {
            let end = geometry.segmentByteOffset(open) + UInt64(geometry.segmentByteCount)
            let start = aligned(plan.appendByteOffset)
            if start + UInt64(byteCount) <= end {
                plan.appendByteOffset = start + UInt64(byteCount)
                return .open(start)
            }
        }
        if plan.freeSegments.count <= Int(geometry.reserveSegmentCount),
           let index = plan.holes.firstIndex(where: { aligned($0.byteOffset) + UInt64(byteCount) <= $0.byteOffset + $0.byteCount }) {
            let hole = plan.holes[index]
            let start = aligned(hole.byteOffset)
            let end = start + UInt64(byteCount)
            if start == hole.byteOffset && end < hole.byteOffset + hole.byteCount {
                // The common case (an aligned hole, partly used) shrinks in place instead of
                // moving the rest of the list twice.
                plan.holes[index] = (end, hole.byteOffset + hole.byteCount - end)
                return .hole(start)
            }
            plan.holes.remove(at: index)
            if end < hole.byteOffset + hole.byteCount { plan.holes.insert((end, hole.byteOffset + hole.byteCount - end), at: index) }
            if start > hole.byteOffset { plan.holes.insert((hole.byteOffset, start - hole.byteOffset), at: index) }
            return .hole(start)
        }
        guard let next = plan.freeSegments.popLast() else { return nil }
        plan.openSegment = next
        let start = geometry.segmentByteOffset(next) + UInt64(PoolGeometry.segmentHeaderByteCount)
        plan.appendByteOffset = start + UInt64(byteCount)
        return .newSegment(next, start)
    }

    /// Places `count` pages (4 KiB, 4 KiB aligned) exactly as `count` calls of
    /// ``place(byteCount:alignment:in:)`` would, in time linear in the holes and segments
    /// rather than in pages × holes: each call would fill the open segment's rest, then
    /// (with the free list at the reserve) the first hole that holds a page, then a new
    /// segment, and consecutive pages keep taking the same hole or segment until it is
    /// full. Holes before the one in use never hold a page (first fit with one size), so
    /// the search goes on from there. False when the pages do not all fit. Admission's
    /// dry run places a whole checkpoint's pages on every write: one call per page moved
    /// the hole list in memory each time, and a nearly full pool of scattered dead pages
    /// made each write cost thousands of list copies.
    func placePages(_ count: Int, in plan: inout AllocationPlan) -> Bool {
        let page = UInt64(PoolGeometry.pageByteCount)
        func aligned(_ offset: UInt64) -> UInt64 { (offset + page - 1) & ~(page - 1) }
        var remaining = UInt64(max(0, count))
        var searchFrom = 0
        while remaining > 0 {
            if let open = plan.openSegment {
                let end = geometry.segmentByteOffset(open) + UInt64(geometry.segmentByteCount)
                let start = aligned(plan.appendByteOffset)
                if start + page <= end {
                    let taken = min(remaining, (end - start) / page)
                    plan.appendByteOffset = start + taken * page
                    remaining -= taken
                    continue
                }
            }
            if plan.freeSegments.count <= Int(geometry.reserveSegmentCount),
               let index = plan.holes[min(searchFrom, plan.holes.count)...].firstIndex(where: { aligned($0.byteOffset) + page <= $0.byteOffset + $0.byteCount }) {
                let hole = plan.holes[index]
                let start = aligned(hole.byteOffset)
                let holeEnd = hole.byteOffset + hole.byteCount
                let taken = min(remaining, (holeEnd - start) / page)
                let end = start + taken * page
                remaining -= taken
                var pieces: [(byteOffset: UInt64, byteCount: UInt64)] = []
                if start > hole.byteOffset { pieces.append((hole.byteOffset, start - hole.byteOffset)) }
                if end < holeEnd { pieces.append((end, holeEnd - end)) }
                plan.holes.replaceSubrange(index...index, with: pieces)
                // The leading piece (alignment slack) holds no page; the trailing one is
                // where the next page would go.
                searchFrom = index + (start > hole.byteOffset ? 1 : 0)
                continue
            }
            // As `place` does: the page goes right after the new segment's header.
            guard let next = plan.freeSegments.popLast() else { return false }
            plan.openSegment = next
            plan.appendByteOffset = geometry.segmentByteOffset(next) + UInt64(PoolGeometry.segmentHeaderByteCount) + page
            remaining -= 1
        }
        return true
    }

    /// Places an extent for real; nil when nothing is left (admission miscounted). A new
    /// segment becomes the open one (the caller writes its header); the previous open
    /// one becomes used.
    mutating func allocate(byteCount: Int, alignment: Int) -> Placement? {
        var plan = allocator
        // The hole list moves into the plan and back, so placing into a hole copies nothing.
        allocator.holes = []
        let placement = place(byteCount: byteCount, alignment: alignment, in: &plan)
        switch placement {
        case .open, nil:
            break
        case .hole:
            holesNeedTrim = true
        case .newSegment(let next, _):
            if let open = allocator.openSegment { states[open] = .used }
            states[next] = .open
        }
        allocator = plan
        return placement
    }

    /// What a sync ends with: later appends start on a fresh 4 KiB boundary, so a torn
    /// write on a device with 4 KiB physical sectors cannot reach bytes the sync made
    /// durable; and so do later writes into holes (the rest of a hole an extent went
    /// into shares that extent's last 4 KiB unit).
    mutating func alignAfterSync() {
        if let open = allocator.openSegment {
            let unit = UInt64(PoolGeometry.durableAlignmentByteCount)
            let end = geometry.segmentByteOffset(open) + UInt64(geometry.segmentByteCount)
            allocator.appendByteOffset = min((allocator.appendByteOffset + unit - 1) & ~(unit - 1), end)
        }
        if holesNeedTrim {
            allocator.holes = Self.wholeUnits(of: allocator.holes)
            holesNeedTrim = false
        }
    }

    /// The open segment's remainder plus every free segment's payload.
    var roomByteCount: UInt64 {
        var total = UInt64(allocator.freeSegments.count) * geometry.segmentPayloadByteCount
        if let open = allocator.openSegment {
            total += geometry.segmentByteOffset(open) + UInt64(geometry.segmentByteCount) - allocator.appendByteOffset
        }
        return total
    }

    /// `holes` trimmed to whole 4 KiB units (``PoolGeometry/durableAlignmentByteCount``),
    /// empty pieces dropped: what may be written without sharing a physical sector with
    /// bytes a sync made durable (Specs/COMMIT.md §5.2, R-2).
    static func wholeUnits(of holes: [(byteOffset: UInt64, byteCount: UInt64)]) -> [(byteOffset: UInt64, byteCount: UInt64)] {
        holes.compactMap { wholeUnits(from: $0.byteOffset, to: $0.byteOffset + $0.byteCount) }
    }

    /// The whole 4 KiB units inside `from..<to` as (offset, byte count), nil when none.
    static func wholeUnits(from: UInt64, to: UInt64) -> (byteOffset: UInt64, byteCount: UInt64)? {
        let unit = UInt64(PoolGeometry.durableAlignmentByteCount)
        let start = (from + unit - 1) & ~(unit - 1), end = to & ~(unit - 1)
        return end > start ? (start, end - start) : nil
    }
}
