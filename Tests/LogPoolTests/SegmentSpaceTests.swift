@testable import LogPool
import LogPoolFormat
import LogPoolTesting
import Testing

/// The segment-space component on its own (issue 11: components with tests of their
/// own): totals stay the sums, the free list stays the free states, placement follows
/// its order, and syncs move the append point and trim holes to whole 4 KiB units.
@Suite("Segment space")
struct SegmentSpaceTests {
    /// An 8 MiB pool of 64 KiB segments, 2 in reserve.
    func geometry() throws -> PoolGeometry {
        try PoolGeometry.make(capacityByteCount: 8 << 20, blockByteCount: 4096, segmentByteCount: 64 << 10).get()
    }

    func checkTotals(_ space: SegmentSpace, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(space.dataLiveTotal == space.dataLive.reduce(0, +), sourceLocation: sourceLocation)
        #expect(space.metaLiveTotal == space.metaLive.reduce(0, +), sourceLocation: sourceLocation)
        #expect(space.freeSegments == space.states.indices.reversed().filter { space.states[$0] == .free }, sourceLocation: sourceLocation)
    }

    @Test("seeded adds, removes, loads and frees keep every total equal to its sum")
    func totalsFollowCounts() throws {
        let g = try geometry()
        for seed in UInt64(1)...20 {
            var generator = SeededGenerator(seed: seed)
            var space = SegmentSpace(geometry: g)
            space.markAllFree()
            var placed: [(UInt64, UInt64)] = []
            for _ in 0..<200 {
                if placed.isEmpty || Bool.random(using: &generator) {
                    let bytes = UInt64(Int.random(in: 1...8, using: &generator) * 512)
                    guard let placement = space.allocate(byteCount: Int(bytes), alignment: 512) else { break }
                    let start: UInt64
                    switch placement {
                    case .open(let s), .hole(let s), .newSegment(_, let s): start = s
                    }
                    space.addData(bytes, at: start)
                    placed.append((start, bytes))
                } else {
                    let (start, bytes) = placed.remove(at: Int.random(in: 0..<placed.count, using: &generator))
                    let removed = space.removeData(bytes, at: start)
                    #expect(removed)
                }
                if Int.random(in: 0..<10, using: &generator) == 0 { space.freeEmptySegments() }
                checkTotals(space)
            }
            // Freed segments hold nothing live; used and open ones do or were written.
            space.freeEmptySegments()
            for s in 0..<space.count where space.states[s] == .free {
                #expect(space.liveByteCount(s) == 0, "seed \(seed): free segment \(s) holds live bytes")
            }
            checkTotals(space)
        }
    }

    @Test("placing a checkpoint's pages at once ends where placing them one by one does (seeded)")
    func placePagesMatchesPlace() throws {
        let g = try geometry()
        let page = UInt64(PoolGeometry.pageByteCount)
        for seed in UInt64(1)...300 {
            var rng = SeededGenerator(seed: seed)
            var space = SegmentSpace(geometry: g)
            space.markAllFree()
            // Holes of odd sizes and alignments in used segments, some too small for a page.
            var holes: [(byteOffset: UInt64, byteCount: UInt64)] = []
            for s in 20..<Int(20 + rng.next() % 40) {
                var cursor = g.segmentByteOffset(s) + page
                let end = g.segmentByteOffset(s) + UInt64(g.segmentByteCount)
                while cursor + 512 < end, rng.next() % 4 != 0 {
                    let gap = (rng.next() % 16) * 512
                    let size = (rng.next() % 20 + 1) * 512
                    guard cursor + gap + size <= end else { break }
                    holes.append((cursor + gap, size))
                    cursor += gap + size + 512
                }
            }
            space.setHoles(holes)
            var plan = space.allocator
            // The free list at, above or below the reserve; the open segment full, part
            // full or missing.
            let keep = Int(rng.next() % 5)
            plan.freeSegments = Array(plan.freeSegments.suffix(keep))
            switch rng.next() % 3 {
            case 0: plan.openSegment = nil
            case 1:
                plan.openSegment = 70
                plan.appendByteOffset = g.segmentByteOffset(70) + page + (rng.next() % 120) * 512
            default:
                plan.openSegment = 70
                plan.appendByteOffset = g.segmentByteOffset(71)
            }
            let count = Int(rng.next() % 200)
            var batch = plan, single = plan
            let fitsBatch = space.placePages(count, in: &batch)
            var fitsSingle = true
            for _ in 0..<count where fitsSingle {
                fitsSingle = space.place(byteCount: Int(page), alignment: Int(page), in: &single) != nil
            }
            #expect(fitsBatch == fitsSingle, "seed \(seed): \(count) pages fit \(fitsBatch) at once, \(fitsSingle) one by one")
            guard fitsBatch && fitsSingle else { continue }
            #expect(batch.openSegment == single.openSegment && batch.appendByteOffset == single.appendByteOffset
                    && batch.freeSegments == single.freeSegments, "seed \(seed): \(count) pages end elsewhere")
            #expect(batch.holes.map { [$0.byteOffset, $0.byteCount] } == single.holes.map { [$0.byteOffset, $0.byteCount] },
                    "seed \(seed): \(count) pages leave other holes")
        }
    }

    @Test("placement order: the open segment, then the lowest free segment, holes only at the reserve")
    func placementOrder() throws {
        let g = try geometry()
        var space = SegmentSpace(geometry: g)
        space.markAllFree()
        guard case .newSegment(0, let first)? = space.allocate(byteCount: 4096, alignment: 4096) else {
            Issue.record("the first extent must open segment 0")
            return
        }
        #expect(first == g.segmentByteOffset(0) + UInt64(PoolGeometry.segmentHeaderByteCount))
        guard case .open(let second)? = space.allocate(byteCount: 512, alignment: 512) else {
            Issue.record("the second extent must go to the open segment")
            return
        }
        #expect(second == first + 4096)
        // A hole is not used while more than the reserve is free.
        space.setHoles([(g.segmentByteOffset(5) + 8192, 8192)])
        var plan = space.allocator
        plan.openSegment = nil
        guard case .newSegment(1, _)? = space.place(byteCount: 4096, alignment: 4096, in: &plan) else {
            Issue.record("with free segments above the reserve a new segment is opened, not a hole")
            return
        }
        // Down to the reserve: the hole is used, page aligned.
        plan = space.allocator
        plan.openSegment = nil
        plan.freeSegments = Array(plan.freeSegments.suffix(Int(g.reserveSegmentCount)))
        guard case .hole(let start)? = space.place(byteCount: 4096, alignment: 4096, in: &plan) else {
            Issue.record("at the reserve the hole is used")
            return
        }
        #expect(start == g.segmentByteOffset(5) + 8192)
        #expect(plan.holes.count == 1 && plan.holes[0].byteOffset == start + 4096)
    }

    @Test("a sync moves the append point to the next 4 KiB unit and trims holes an extent went into")
    func syncAlignment() throws {
        let g = try geometry()
        var space = SegmentSpace(geometry: g)
        space.markAllFree()
        _ = space.allocate(byteCount: 512, alignment: 512)
        space.alignAfterSync()
        #expect(space.appendByteOffset % 4096 == 0)
        #expect(space.appendByteOffset == g.segmentByteOffset(0) + UInt64(PoolGeometry.segmentHeaderByteCount) + 4096)
        // An extent placed in a hole leaves the rest starting mid-unit; the sync trims it.
        let hole = (byteOffset: g.segmentByteOffset(3) + 4096, byteCount: UInt64(16384))
        space.setHoles([hole])
        var plan = space.allocator
        plan.openSegment = nil
        plan.freeSegments = []
        _ = space.place(byteCount: 512, alignment: 512, in: &plan)
        #expect(plan.holes[0].byteOffset == hole.byteOffset + 512)
        #expect(SegmentSpace.wholeUnits(of: plan.holes).first?.byteOffset == hole.byteOffset + 4096)
    }
}
