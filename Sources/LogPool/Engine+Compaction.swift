import LogPoolFormat

/// What one compaction pass did.
public struct CompactionReport: Sendable, Equatable {
    public var segmentsCompacted = 0
    public var blocksMoved = 0
    public var bytesMoved: UInt64 = 0
    public var pagesRewritten = 0
    /// Segments that became free (including ones already dead before the pass).
    public var segmentsFreed = 0
    public var bytesFreed: UInt64 = 0
}

extension Engine {
    /// Live bytes (data and durable metadata) in segment `s`.
    func liveByteCount(_ s: Int) -> UInt64 { dataLiveByteCounts[s] + metaLiveByteCounts[s] }

    /// The used segment with the least live data, if moving it would free anything.
    func compactionVictim(maxLiveFraction: Double = 1.0) -> Int? {
        var best: Int? = nil
        for s in 0..<segmentStates.count where segmentStates[s] == .used {
            let live = liveByteCount(s)
            guard Double(live) < Double(geometry.segmentPayloadByteCount) * maxLiveFraction else { continue }
            if best == nil || live < liveByteCount(best!) { best = s }
        }
        return best
    }

    /// Moves every live block and page out of the emptiest segment, journals the moves and
    /// checkpoints so the segment becomes free (Specs/COMMIT.md §6). Returns false when
    /// nothing can be gained or there is no room to move into.
    @discardableResult
    func compactOneSegment(maxLiveFraction: Double = 1.0, report: inout CompactionReport) throws -> Bool {
        guard let victim = compactionVictim(maxLiveFraction: maxLiveFraction) else { return false }
        let victimStart = geometry.segmentByteOffset(victim)
        let victimRange = victimStart..<(victimStart + UInt64(geometry.segmentByteCount))
        // Blocks living in the victim.
        var moving: [(UInt64, BlockLocation)] = []
        for id in 1..<blockIDLimit where refcounts[Int(id)] > 0 {
            let location = blockLocation(id)
            if victimRange.contains(location.byteOffset) { moving.append((id, location)) }
        }
        let dataBytes = moving.reduce(UInt64(0)) { $0 + $1.1.allocatedByteCount }
        let victimPages = Int(metaLiveByteCounts[victim] / UInt64(PoolGeometry.pageByteCount)) + 1
        let pages = moving.count * (blockTable.height + 1) + victimPages * 8 + 2
        // Compaction may dip into the reserve: that is what the reserve is for.
        let need = dataBytes + UInt64(pages * PoolGeometry.pageByteCount) + checkpointNeedByteCount
            + UInt64(blockByteCount + PoolGeometry.pageByteCount)
        guard appendableByteCount >= need else { return false }
        let gain = geometry.segmentPayloadByteCount
        guard liveByteCount(victim) + UInt64(pages * PoolGeometry.pageByteCount) < gain || moving.isEmpty else { return false }

        // Copy blocks forward in chunks; each chunk is one relocate record.
        var index = 0
        while index < moving.count {
            let chunk = moving[index..<min(index + 1024, moving.count)]
            var batch = WriteBatch()
            var moves: [BlockRelocation] = []
            for (id, location) in chunk {
                let bytes = try deviceCall { try device.read(byteCount: Int(location.allocatedByteCount), at: location.byteOffset) }
                let offset = allocateExtent(byteCount: Int(location.allocatedByteCount), batch: &batch)
                batch.add(bytes, at: offset)
                var moved = location
                moved.byteOffset = offset
                moves.append(BlockRelocation(blockID: id, location: moved))
                report.bytesMoved += location.allocatedByteCount
            }
            try deviceCall { try batch.write(to: device) }
            let intent = JournalIntent.relocate(moves)
            if journal.freeByteCount < JournalWriter.worstCaseByteCount(payloadByteCount: intent.payloadByteCount) {
                try checkpoint()
            }
            try journalAndApply(intent)
            report.blocksMoved += moves.count
            index += chunk.count
        }
        // Pages of the durable checkpoint in the victim: dirty them (and their ancestors) so
        // the checkpoint below writes them elsewhere.
        report.pagesRewritten += dirtyPages(in: victimRange)
        compactionMovedByteCount += dataBytes
        try checkpoint()
        report.segmentsCompacted += 1
        return true
    }

    func compactOneSegment() throws -> Bool {
        var report = CompactionReport()
        return try compactOneSegment(report: &report)
    }

    /// Marks dirty every clean node whose page lies in `range`, and every ancestor of one.
    /// Returns how many pages were in the range.
    private func dirtyPages(in range: Range<UInt64>) -> Int {
        var visited: [ObjectIdentifier: Bool] = [:]
        var count = 0
        func visit(_ node: TreeNode) -> Bool {
            if let known = visited[ObjectIdentifier(node)] { return known }
            var changed = false
            if node.level > 0 {
                for child in node.children { if let child, visit(child) { changed = true } }
            }
            if !node.isDirty && range.contains(node.disk.byteOffset) {
                count += 1
                changed = true
            }
            if changed && !node.isDirty {
                pendingPageReleases.append(node.disk.byteOffset)
                node.disk = .none
                dirtyPageCount += 1
            }
            let result = changed || node.isDirty
            visited[ObjectIdentifier(node)] = result
            return result
        }
        if let root = blockTable.root { _ = visit(root) }
        for volume in volumes.values { if let root = volume.map.root { _ = visit(root) } }
        return count
    }

    /// Explicit compaction (`logpool compact`): checkpoint to free dead segments, then
    /// compact every segment that is at most 90% live.
    func compactAll() throws -> CompactionReport {
        try checkWritable()
        var report = CompactionReport()
        let freeBefore = segmentStates.filter { $0 == .free }.count
        try checkpoint()
        var budget = segmentStates.count
        while budget > 0 {
            budget -= 1
            guard try compactOneSegment(maxLiveFraction: 0.9, report: &report) else { break }
        }
        let freeAfter = segmentStates.filter { $0 == .free }.count
        report.segmentsFreed = max(0, freeAfter - freeBefore)
        report.bytesFreed = UInt64(report.segmentsFreed) * UInt64(geometry.segmentByteCount)
        return report
    }
}
