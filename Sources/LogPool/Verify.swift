import Foundation
import Synchronization
import LogPoolFormat

// MARK: - Report types

/// How bad a finding is. Only errors make a pool unhealthy (exit status 1 or 4).
public enum FindingSeverity: String, Codable, Sendable {
    /// Damage or inconsistency.
    case error
    /// Worth knowing, harmless to data (a torn journal tail after a crash, a damaged
    /// segment header).
    case warning
    /// Normal state described (the previous superblock generation in the other slot).
    case info
}

/// A volume or snapshot that reads a damaged block, and where.
public struct BlockOwner: Codable, Sendable, Equatable {
    public var volume: String
    /// Offset of the block inside that volume.
    public var byteOffset: UInt64
}

/// One thing `verify` found. `code` is stable (tests and scripts match on it);
/// `structure`, `byteOffset` (in the pool file) and `detail` say what and where.
public struct Finding: Codable, Sendable, Equatable, CustomStringConvertible {
    public var severity: FindingSeverity
    public var code: String
    public var structure: String
    public var byteOffset: UInt64?
    public var detail: String
    /// Whether `--repair` can fix it without losing user data.
    public var repairable: Bool
    /// For damaged data blocks: every volume and snapshot that reads it.
    public var owners: [BlockOwner]

    public var description: String {
        var line = "\(severity.rawValue): \(code): \(structure)"
        if let byteOffset { line += " at byte offset \(byteOffset)" }
        line += ": \(detail)"
        if !owners.isEmpty {
            line += " (owners: " + owners.map { "\($0.volume) @ \($0.byteOffset)" }.joined(separator: ", ") + ")"
        }
        if severity != .info { line += repairable ? " [repairable]" : " [not repairable]" }
        return line
    }
}

/// A byte range the durable state references: what recovery may read, so nothing may
/// overwrite it before a newer state is durable (the crash harness's write-time check
/// W1, Specs/CRASHSIM.md).
public struct ReferencedExtent: Sendable, Equatable {
    public var byteOffset: UInt64
    public var byteCount: UInt64
    /// "checkpoint root", "page", "block" or "journal".
    public var structure: String
}

/// What `verify` (and `scrub`) found, with the figures it checked.
public struct VerifyReport: Codable, Sendable {
    public var findings: [Finding] = []
    public var scrubbed = false
    /// "A" or "B" and its generation; empty when no slot is valid.
    public var chosenSlot = ""
    public var generation: UInt64 = 0
    public var cleanlyClosed = false
    public var replayedRecordCount = 0
    public var replayStop = ""
    public var pageCount = 0
    public var volumeCount = 0
    public var referencedBlockCount = 0
    /// Segments whose stored live bytes exceed the rebuilt figure (space nothing uses),
    /// and the bytes involved: qcow2's "leaks".
    public var leakedSegmentCount = 0
    public var leakedByteCount: UInt64 = 0
    /// Segments whose stored live bytes are below the rebuilt figure (referenced data the
    /// stored accounting does not cover): qcow2's refcount "errors".
    public var accountingErrorSegmentCount = 0
    public var accountingErrorByteCount: UInt64 = 0
    public var damagedBlockCount = 0
    /// Bytes of data blocks and pages read and checksummed, and how long it took.
    public var scrubbedByteCount: UInt64 = 0
    public var seconds = 0.0

    public var errorCount: Int { findings.filter { $0.severity == .error }.count }
    public var warningCount: Int { findings.filter { $0.severity == .warning }.count }
    public var isClean: Bool { errorCount == 0 }
    /// fsck's convention without a repair: 0 clean, 4 errors.
    public var exitStatus: Int32 { isClean ? 0 : 4 }

    /// Findings that are errors or warnings (info lines describe normal state).
    public var problems: [Finding] { findings.filter { $0.severity != .info } }
}

/// Progress of a scrub: bytes read so far of the total it will read.
public struct ScrubProgress: Sendable {
    public var doneByteCount: UInt64
    public var totalByteCount: UInt64
    public var seconds: Double
}

/// What `repair` did: the report before, the one after, and each change it made.
public struct RepairReport: Codable, Sendable {
    public var before: VerifyReport
    public var after: VerifyReport
    public var changes: [String]

    /// fsck's convention: 0 clean, 1 errors found and all repaired, 4 errors left.
    public var exitStatus: Int32 { after.isClean ? (before.isClean ? 0 : 1) : 4 }
}

// MARK: - Public entry points

extension Pool {
    /// Checks the pool file at `path` without trusting the engine's state and without
    /// writing: opens it with a shared lock (so it works on a pool that was not cleanly
    /// closed, and refuses one a writer holds), checks both superblock slots, the
    /// checkpoint and every page, the journal, block references, space accounting and the
    /// volume table; with `scrubData` also reads every live data block and checks its
    /// checksum. Every finding is reported, not only the first.
    ///
    /// Throws only when it cannot check at all: no such file, I/O error, in use, or not a
    /// LogPool pool (bad magic in both slots).
    public static func verify(at path: String, scrubData: Bool = false,
                              progress: (@Sendable (ScrubProgress) -> Void)? = nil) throws -> VerifyReport {
        let device = try FileDevice(path: path, mode: .readOnly)
        defer { device.closeDescriptor() }
        return try verify(on: device, scrubData: scrubData, progress: progress)
    }

    /// ``verify(at:scrubData:progress:)`` on any device (tests use an in-memory one).
    public static func verify(on device: BlockDevice, scrubData: Bool = false,
                              progress: (@Sendable (ScrubProgress) -> Void)? = nil) throws -> VerifyReport {
        var checker = Checker(device: device)
        return try checker.run(scrubData: scrubData, progress: progress)
    }

    /// Every byte range the newest valid slot's state references (root, pages, blocks,
    /// the journal from its replay start to where replay stops), read-only. Empty when no
    /// slot is valid. For the crash harness's "never overwrite what a durable state
    /// references" check (Specs/CRASHSIM.md, W1).
    public static func referencedExtents(on device: BlockDevice) throws -> [ReferencedExtent] {
        var checker = Checker(device: device)
        checker.collectExtents = true
        _ = try checker.run(scrubData: false, progress: nil)
        return checker.extents
    }

    /// Verifies, then rebuilds what is derived and repairable through the normal commit
    /// protocol: opening read-write replays the journal, rebuilds refcounts and segment
    /// usage and commits a new checkpoint to the older slot (which rewrites a damaged or
    /// stale slot and moves the journal start past a torn tail); closing commits once
    /// more, so both slots are valid. Damaged data blocks are never dropped: they stay
    /// reported and reading them keeps failing with a checksum error.
    public static func repair(at path: String, scrubData: Bool = false,
                              progress: (@Sendable (ScrubProgress) -> Void)? = nil) throws -> RepairReport {
        let before = try verify(at: path, scrubData: scrubData, progress: progress)
        return try repair(before: before, scrubData: scrubData,
                          open: { try Pool.openRebuildingCounts(at: path) },
                          verify: { try verify(at: path, scrubData: scrubData, progress: progress) })
    }

    /// ``repair(at:scrubData:progress:)`` on any device.
    public static func repair(on device: BlockDevice, scrubData: Bool = false) throws -> RepairReport {
        let before = try verify(on: device, scrubData: scrubData)
        return try repair(before: before, scrubData: scrubData,
                          open: { try Pool.openRebuildingCounts(on: device) },
                          verify: { try verify(on: device, scrubData: scrubData) })
    }

    private static func repair(before: VerifyReport, scrubData: Bool, open: () throws -> Pool,
                               verify: () throws -> VerifyReport) throws -> RepairReport {
        guard before.problems.contains(where: \.repairable) else {
            return RepairReport(before: before, after: before, changes: [])
        }
        // Opening read-write commits a checkpoint at the replay stop: with synced records
        // after it, that would discard them. That is the operator's call, not repair's.
        if before.problems.contains(where: { $0.code == "journal-synced-damage" }) {
            return RepairReport(before: before, after: before, changes: [
                "not repaired: the journal is damaged inside synced space, and committing would discard the synced records after the damage; to read what precedes it, open with acceptJournalLoss read-only (CLI: --salvage); to keep the pool without those records, copy the file, then open the copy read-write with acceptJournalLoss"])
        }
        var changes: [String] = []
        do {
            let pool = try open()
            let recovery = pool.recoveryReport
            try pool.close()
            changes.append("committed generations \(recovery.generation + 1) and later through the normal protocol (journal replayed: \(recovery.replayedRecordCount) records; \(recovery.replayStopReason))")
            changes += recovery.findings.map { "rebuilt: \($0)" }
        } catch PoolError.inUse(let detail) {
            throw PoolError.inUse(detail)
        } catch let error as PoolError {
            changes.append("could not open the pool read-write to repair it: \(error)")
            return RepairReport(before: before, after: before, changes: changes)
        }
        let after = try verify()
        // A finding is the same one when its code, structure and offset match (details
        // such as counts may change with the commit).
        func same(_ a: Finding, _ b: Finding) -> Bool {
            a.code == b.code && a.structure == b.structure && a.byteOffset == b.byteOffset
        }
        for finding in before.problems where finding.repairable && !after.problems.contains(where: { same($0, finding) }) {
            changes.append("fixed: \(finding.code): \(finding.structure): \(finding.detail)")
        }
        return RepairReport(before: before, after: after, changes: changes)
    }
}

// MARK: - The checker

/// The one consistency checker (Specs/VERIFY.md). It decodes the durable structures
/// itself, tolerating damage so that it can report every finding; the journal is judged
/// by a read-only, in-memory open of the engine (the same replay recovery runs), whose
/// resulting state is then checked against the trees and scrubbed.
struct Checker {
    let device: BlockDevice
    var report = VerifyReport()

    init(device: BlockDevice) {
        self.device = device
    }

    private mutating func add(_ severity: FindingSeverity, _ code: String, _ structure: String, _ byteOffset: UInt64?,
                              _ detail: String, repairable: Bool = false, owners: [BlockOwner] = []) {
        report.findings.append(Finding(severity: severity, code: code, structure: structure, byteOffset: byteOffset,
                                       detail: detail, repairable: repairable, owners: owners))
    }

    /// Reads `count` bytes of `structure`; an I/O error (an unreadable sector) becomes an
    /// `unreadable` error finding and nil, so the check goes on with everything else.
    private mutating func read(_ count: Int, at offset: UInt64, _ structure: String,
                               severity: FindingSeverity = .error) throws -> [UInt8]? {
        do {
            return try device.read(byteCount: count, at: offset)
        } catch PoolError.io(let code, let operation, let at) {
            add(severity, "unreadable", structure, at, "\(operation) failed with errno \(code) (\(count) bytes from byte offset \(offset))")
            return nil
        }
    }

    /// Derived refcounts by id, and ids named by maps beyond the id limit.
    private struct BlockReferences {
        var refcounts: [UInt32]
        var beyondLimit: [UInt64]
    }

    /// A page as decoded by the checker.
    private struct CheckedPage {
        var kind: PageKind
        var level: Int
        var checksum: UInt64
        var words: [UInt64]
        /// The first slot the page covers where it was first reached (P-4).
        var base: UInt64
    }

    /// Block-table leaf pages that were referenced but could not be read or decoded:
    /// they count towards the C-6 bound, so damage to one does not also flag the limit.
    var unreadableTableLeafCount = 0
    /// A refcount page could not be read or decoded (``refcountPageDamaged(_:_:)``).
    var refcountTreeDamaged = false
    /// Those leaves: the index of their `page-damaged` finding and their first id, so
    /// one that holds no referenced id can be reported as what it is (below).
    private var damagedTableLeaves: [(finding: Int, firstID: UInt64)] = []

    /// Filled by ``check`` when `collectExtents` is set.
    var collectExtents = false
    var extents: [ReferencedExtent] = []

    mutating func run(scrubData: Bool, progress: (@Sendable (ScrubProgress) -> Void)?) throws -> VerifyReport {
        let start = Date()
        report.scrubbed = scrubData
        try check(scrubData: scrubData, progress: progress)
        report.seconds = Date().timeIntervalSince(start)
        return report
    }

    private mutating func check(scrubData: Bool, progress: (@Sendable (ScrubProgress) -> Void)?) throws {
        guard let sb = try checkSuperblocks() else { return }
        guard let storedRoot = try checkCheckpointRoot(sb) else { return }
        var pages: [UInt64: CheckedPage] = [:]
        try loadPages(sb, storedRoot, into: &pages)
        // C-6: the id limit must be justified by the block-table leaves read; the checker
        // sizes its id-indexed arrays by the justified bound, never by the stored figure.
        var root = storedRoot
        let tableLeafCount = pages.values.reduce(0) { $0 + ($1.kind == .blockTable && $1.level == 0 ? 1 : 0) } + unreadableTableLeafCount
        let limitMax = Engine.blockIDLimitMax(blockTableLeafCount: tableLeafCount, blockByteCount: Int(sb.geometry.blockByteCount))
        if root.blockIDLimit > limitMax {
            add(.error, "checkpoint-damaged", "checkpoint", sb.checkpointByteOffset,
                "block id limit \(root.blockIDLimit) exceeds \(limitMax), the most that a block table of \(tableLeafCount) readable leaf pages allows (FORMAT C-6); ids from \(limitMax) on are checked as beyond the limit")
            root.blockIDLimit = limitMax
        }
        let references = checkVolumeTable(sb, root, pages)
        // A damaged block-table leaf that holds no referenced id loses nothing: its
        // bytes do not matter (FORMAT §5.3), and the next write that takes an id in its
        // range replaces it with an empty leaf. A warning, not an error.
        // (Only when every map page was read: the references are complete then.)
        let fanout = UInt64(PageLayout.blockTableLeafFanout)
        let mapsComplete = !report.findings.contains {
            ($0.code == "page-damaged" || $0.code == "page-pointer-invalid") && $0.structure == "map page"
        }
        for (index, firstID) in damagedTableLeaves where mapsComplete {
            let upper = min(firstID + fanout, UInt64(references.refcounts.count))
            guard firstID >= upper || !references.refcounts[Int(firstID)..<Int(upper)].contains(where: { $0 != 0 }) else { continue }
            report.findings[index].severity = .warning
            report.findings[index].detail += "; it holds no referenced block id (ids \(firstID)..<\(firstID + fanout)), so nothing is lost: the next write that takes an id in its range replaces it with an empty leaf"
        }
        checkRefcounts(root, pages, references: references, mapsComplete: mapsComplete, rootByteOffset: sb.checkpointByteOffset)
        let entries = checkBlockTable(sb, root, pages, references: references)
        let rebuilt = checkExtentsAndUsage(sb, root, pages, entries: entries)
        try checkSegmentHeaders(sb, rebuilt: rebuilt)
        let engine = checkJournal(sb)
        if collectExtents { try collect(sb, pages: pages, entries: entries, engine: engine) }
        if scrubData {
            try scrub(sb, engine: engine, pages: pages, entries: entries, progress: progress)
        }
    }

    /// What the chosen slot's state references: its root, every page of its checkpoint
    /// (open loads them all), every block its block table names and every block live
    /// after replay, and the journal from the replay start to where replay stops.
    private mutating func collect(_ sb: Superblock, pages: [UInt64: CheckedPage], entries: [BlockLocation], engine: Engine?) throws {
        extents.append(ReferencedExtent(byteOffset: sb.checkpointByteOffset, byteCount: UInt64(sb.checkpointByteCount), structure: "checkpoint root"))
        for offset in pages.keys { extents.append(ReferencedExtent(byteOffset: offset, byteCount: UInt64(PoolGeometry.pageByteCount), structure: "page")) }
        for location in entries where location.storedByteCount > 0 {
            extents.append(ReferencedExtent(byteOffset: location.byteOffset, byteCount: location.allocatedByteCount, structure: "block"))
        }
        guard let engine else { return }
        try engine.forEachLiveBlock { _, location in
            extents.append(ReferencedExtent(byteOffset: location.byteOffset, byteCount: location.allocatedByteCount, structure: "block"))
        }
        let ring = sb.geometry.journalByteCount
        let start = sb.journalReplayByteOffset, stop = UInt64(engine.recoveryReport.replayStopRingOffset)
        let journal = PoolGeometry.journalByteOffset
        if engine.recoveryReport.replayStopKind == .endOfRing {
            extents.append(ReferencedExtent(byteOffset: journal, byteCount: ring, structure: "journal"))
        } else if stop >= start {
            if stop > start { extents.append(ReferencedExtent(byteOffset: journal + start, byteCount: stop - start, structure: "journal")) }
        } else {
            extents.append(ReferencedExtent(byteOffset: journal + start, byteCount: ring - start, structure: "journal"))
            if stop > 0 { extents.append(ReferencedExtent(byteOffset: journal, byteCount: stop, structure: "journal")) }
        }
    }

    // MARK: Superblocks

    private mutating func checkSuperblocks() throws -> Superblock? {
        let size = try device.byteCount()
        let slotsEnd = PoolGeometry.superblockSlotByteOffsets[1] + UInt64(PoolGeometry.superblockByteCount)
        guard size >= slotsEnd else {
            let first = size == 0 ? [] : try device.read(byteCount: min(Int(size), 8), at: 0)
            guard first == SuperblockLayout.magic else {
                throw PoolError.corrupt(structure: "superblock", byteOffset: 0, detail: "not a LogPool pool (bad magic; file is \(size) bytes)")
            }
            add(.error, "truncated", "pool file", size, "file is \(size) bytes, the superblock slots need \(slotsEnd)")
            return nil
        }
        var slots: [Result<Superblock, CorruptionError>] = []
        var versions: [UInt16] = []
        for index in 0..<2 {
            let offset = PoolGeometry.superblockSlotByteOffsets[index]
            guard let bytes = try read(PoolGeometry.superblockByteCount, at: offset, "superblock slot \(index == 0 ? "A" : "B")") else {
                slots.append(.failure(CorruptionError("superblock", at: offset, "slot \(index == 0 ? "A" : "B") is unreadable")))
                continue
            }
            if let version = Superblock.formatVersion(ofSlot: bytes) { versions.append(version) }
            slots.append(Result { () throws(CorruptionError) in try Superblock.decode(bytes, slotIndex: index) })
        }
        let choice: SuperblockChoice
        do {
            choice = try chooseSuperblock(slots[0], slots[1])
        } catch {
            if error.detail.hasPrefix("not a LogPool pool") { throw PoolError(error) }
            // Another format's pool, as open says (nothing of it can be checked here).
            if let other = PoolError.otherFormat(versions) { throw other }
            for (index, slot) in slots.enumerated() {
                if case .failure(let e) = slot {
                    add(.error, "superblock-damaged", Superblock.structureName(slotIndex: index),
                        PoolGeometry.superblockSlotByteOffsets[index], e.detail)
                }
            }
            if case .success = slots[0], case .success = slots[1] {
                add(.error, "superblock-foreign", "superblock", 0, error.detail)
            }
            add(.error, "no-valid-superblock", "superblock", 0, "no slot can be used; nothing else can be checked")
            return nil
        }
        let sb = choice.chosen
        let other = 1 - sb.slotIndex
        let otherName = Superblock.structureName(slotIndex: other)
        report.chosenSlot = sb.slotIndex == 0 ? "A" : "B"
        report.generation = sb.generation
        report.cleanlyClosed = !sb.isMounted
        add(.info, "superblock-chosen", Superblock.structureName(slotIndex: sb.slotIndex),
            PoolGeometry.superblockSlotByteOffsets[sb.slotIndex], "chosen: generation \(sb.generation)")
        switch slots[other] {
        case .failure(let e):
            add(.error, "superblock-damaged", otherName, PoolGeometry.superblockSlotByteOffsets[other], e.detail, repairable: true)
        case .success(let o):
            if let problem = choice.otherSlotProblem {
                add(.error, "superblock-stale", otherName, PoolGeometry.superblockSlotByteOffsets[other], problem, repairable: true)
            } else {
                add(.info, "superblock-previous", otherName, PoolGeometry.superblockSlotByteOffsets[other],
                    "valid: generation \(o.generation), the parent of the chosen slot")
            }
        }
        guard size >= sb.geometry.capacityByteCount else {
            add(.error, "truncated", "pool file", size, "file is \(size) bytes, the superblock describes \(sb.geometry.capacityByteCount)")
            return nil
        }
        return sb
    }

    // MARK: Checkpoint and pages

    private mutating func checkCheckpointRoot(_ sb: Superblock) throws -> CheckpointRoot? {
        guard let bytes = try read(Int(sb.checkpointByteCount), at: sb.checkpointByteOffset, "checkpoint root") else { return nil }
        do {
            let root = try CheckpointRoot.decode(bytes, expectedChecksum: sb.checkpointChecksum, salt: sb.poolSalt,
                                                 byteOffset: sb.checkpointByteOffset, geometry: sb.geometry)
            report.volumeCount = root.volumes.count
            return root
        } catch {
            add(.error, "checkpoint-damaged", error.structure, error.byteOffset, error.detail)
            add(.error, "not-checked", "pool", nil, "the checkpoint root is unreadable: pages, blocks and journal were not checked")
            return nil
        }
    }

    /// Reads and decodes every page reachable from the root, each once, reporting every
    /// unreadable page (its subtree is then unknown) and every sharing violation (P-2/P-3).
    private mutating func loadPages(_ sb: Superblock, _ root: CheckpointRoot, into pages: inout [UInt64: CheckedPage]) throws {
        var trees: [(PagePointer, PageKind, Int, String)] = [(root.blockTableRoot, .blockTable, root.blockTableHeight - 1, "the block table"),
                                                             (root.refcountRoot, .refcounts, root.refcountHeight - 1, "the refcount tree")]
        for volume in root.volumes { trees.append((volume.mapRoot, .map, volume.mapHeight - 1, "volume \(volume.name)")) }
        for queued in root.releaseQueue { trees.append((queued.mapRoot, .map, queued.mapHeight - 1, "deleted volume \(queued.id) (release queue)")) }
        for (pointer, kind, level, owner) in trees {
            try visit(pointer, kind: kind, level: level, base: 0, owner: owner, sb: sb, pages: &pages)
        }
        report.pageCount = pages.count
    }

    private mutating func visit(_ pointer: PagePointer, kind: PageKind, level: Int, base: UInt64, owner: String, sb: Superblock,
                                pages: inout [UInt64: CheckedPage]) throws {
        guard !pointer.isNone else { return }
        let name = kind.pageName
        if let seen = pages[pointer.byteOffset] {
            if seen.kind != kind || seen.level != level || seen.checksum != pointer.checksum {
                add(.error, "page-shared-wrongly", name, pointer.byteOffset,
                    "referenced (from \(owner)) as \(kind) level \(level), already seen as \(seen.kind) level \(seen.level)")
            } else if kind != .map {
                add(.error, "page-shared-wrongly", name, pointer.byteOffset, "\(name) has two parents")
            } else if seen.base != base {
                add(.error, "page-shared-wrongly", name, pointer.byteOffset,
                    "referenced (from \(owner)) at block index \(base), already reached at block index \(seen.base): a shared page must cover the same blocks everywhere (P-4)")
            }
            return
        }
        guard sb.geometry.isValidExtent(byteOffset: pointer.byteOffset, byteCount: UInt64(PoolGeometry.pageByteCount)) else {
            add(.error, "page-pointer-invalid", name, pointer.byteOffset, "pointer (from \(owner)) is outside every segment")
            return
        }
        let bytes: [UInt8]
        do {
            bytes = try device.read(byteCount: PoolGeometry.pageByteCount, at: pointer.byteOffset)
        } catch PoolError.io(let code, _, _) {
            if kind == .refcounts { return refcountPageDamaged(pointer, "unreadable, errno \(code)") }
            add(.error, "page-damaged", name, pointer.byteOffset, "unreadable, errno \(code) (in \(owner); its subtree is unchecked)")
            if kind == .blockTable && level == 0 {
                unreadableTableLeafCount += 1
                damagedTableLeaves.append((report.findings.count - 1, base))
            }
            return
        }
        report.scrubbedByteCount += UInt64(bytes.count)
        let words: [UInt64]
        do {
            words = try PageLayout.decode(bytes, kind: kind, level: level, expectedChecksum: pointer.checksum,
                                          salt: sb.poolSalt, byteOffset: pointer.byteOffset)
        } catch {
            if kind == .refcounts { return refcountPageDamaged(pointer, "\(error.detail) (byte offset \(error.byteOffset))") }
            add(.error, "page-damaged", name, pointer.byteOffset,
                "\(error.detail) (byte offset \(error.byteOffset); in \(owner); its subtree is unreadable)")
            if kind == .blockTable && level == 0 {
                unreadableTableLeafCount += 1
                damagedTableLeaves.append((report.findings.count - 1, base))
            }
            return
        }
        pages[pointer.byteOffset] = CheckedPage(kind: kind, level: level, checksum: pointer.checksum, words: words, base: base)
        guard level > 0 else { return }
        for i in 0..<PageLayout.interiorFanout {
            try visit(PagePointer(byteOffset: words[2 * i], checksum: words[2 * i + 1]), kind: kind, level: level - 1,
                      base: PageLayout.childBase(base, index: i, kind: kind, level: level),
                      owner: owner, sb: sb, pages: &pages)
        }
    }

    /// A damaged refcount page loses nothing: the counts are derived data, which open
    /// rebuilds from the maps when the stored tree cannot be read (COMMIT §4 step 4) and
    /// the next checkpoint writes again. A warning, repairable.
    private mutating func refcountPageDamaged(_ pointer: PagePointer, _ detail: String) {
        refcountTreeDamaged = true
        add(.warning, "refcounts-damaged", PageKind.refcounts.pageName, pointer.byteOffset,
            "\(detail); nothing is lost: open rebuilds the counts from the maps and the next checkpoint stores them again", repairable: true)
    }

    /// Compares the stored refcounts (FORMAT §5.4) with those derived from the maps: a
    /// difference is an error (a wrong zero would let a referenced id be reused), which
    /// repair fixes by rebuilding the counts from the maps. Not compared when a refcount
    /// page is damaged (open rebuilds them all then) or a map page is (the derived
    /// counts are incomplete).
    private mutating func checkRefcounts(_ root: CheckpointRoot, _ pages: [UInt64: CheckedPage], references: BlockReferences, mapsComplete: Bool,
                                         rootByteOffset: UInt64) {
        // A leaf breaking C-9 is refused by open, which then rebuilds every count: damage
        // that loses nothing, like a page that fails its checksum.
        for (offset, page) in pages.sorted(by: { $0.key < $1.key }) where page.kind == .refcounts && page.level == 0 {
            if let problem = BlockIDs.storedLeafProblem(leaf: page.base / UInt64(PageLayout.wordCapacity), words: page.words, limit: root.blockIDLimit) {
                refcountPageDamaged(PagePointer(byteOffset: offset, checksum: page.checksum), problem)
                return
            }
        }
        guard !refcountTreeDamaged, mapsComplete else { return }
        let perLeaf = PageLayout.refcountsPerLeaf
        let counts = references.refcounts
        // C-10: the live count the root stores sizes the id space writes reserve.
        let derivedLive = counts.reduce(0) { $0 + ($1 > 0 ? 1 : 0) }
        if UInt64(derivedLive) != root.liveBlockCount {
            add(.error, "refcount-mismatch", "checkpoint", rootByteOffset,
                "the root stores \(root.liveBlockCount) live block ids, the maps name \(derivedLive) (FORMAT C-10)", repairable: true)
        }
        var seenLeaves = Set<Int>()
        var wrong: [(id: Int, stored: UInt32, derived: UInt32)] = []
        var wrongCount = 0
        var firstPage: UInt64? = nil
        var visited = Set<UInt64>(), revisits = 0
        func compare(_ id: Int, _ stored: UInt32, page: UInt64?) {
            let derived = id < counts.count ? counts[id] : 0
            guard stored != derived else { return }
            wrongCount += 1
            if wrong.count < 5 { wrong.append((id, stored, derived)) }
            if firstPage == nil { firstPage = page }
        }
        var leafPages: [Int: UInt64] = [:]
        for (offset, page) in pages where page.kind == .refcounts && page.level == 0 {
            leafPages[Int(page.base / UInt64(PageLayout.wordCapacity))] = offset
        }
        forEachLeaf(root.refcountRoot, kind: .refcounts, level: root.refcountHeight - 1, base: 0, pages: pages,
                    visited: &visited, revisits: &revisits) { base, words in
            // A leaf beyond the id space holds only zeros (checked above): nothing to compare.
            guard base / UInt64(PageLayout.wordCapacity) < UInt64(BlockIDs.leafCount(root.blockIDLimit)) else { return }
            let leaf = Int(base / UInt64(PageLayout.wordCapacity))
            seenLeaves.insert(leaf)
            for (k, word) in words.enumerated() {
                compare(leaf * perLeaf + 2 * k, UInt32(truncatingIfNeeded: word), page: leafPages[leaf])
                compare(leaf * perLeaf + 2 * k + 1, UInt32(truncatingIfNeeded: word >> 32), page: leafPages[leaf])
            }
        }
        // A missing leaf stores zeros.
        for id in 1..<max(counts.count, 1) where counts[id] != 0 && !seenLeaves.contains(id / perLeaf) {
            compare(id, 0, page: nil)
        }
        guard wrongCount > 0 else { return }
        let examples = wrong.map { "id \($0.id): stored \($0.stored), maps name it in \($0.derived) leaves" }.joined(separator: "; ")
        add(.error, "refcount-mismatch", PageKind.refcounts.pageName, firstPage ?? root.refcountRoot.byteOffset,
            "\(wrongCount) stored refcounts differ from the maps (\(examples)); a count too low would let a referenced block id be reused", repairable: true)
    }

    /// Calls `body(first slot, words)` for every decoded leaf of the tree under `pointer`,
    /// each page once: a page met twice within one tree (a DAG, which P-3 allows only
    /// between trees) is counted in `revisits` and not walked again, so a crafted graph of
    /// shared pages cannot make the walk exponential. Slot arithmetic saturates.
    private func forEachLeaf(_ pointer: PagePointer, kind: PageKind, level: Int, base: UInt64,
                             pages: [UInt64: CheckedPage], visited: inout Set<UInt64>, revisits: inout Int,
                             _ body: (UInt64, [UInt64]) -> Void) {
        guard !pointer.isNone, let page = pages[pointer.byteOffset], page.kind == kind, page.level == level else { return }
        guard visited.insert(pointer.byteOffset).inserted else {
            revisits += 1
            return
        }
        if level == 0 { return body(base, page.words) }
        for i in 0..<PageLayout.interiorFanout {
            forEachLeaf(PagePointer(byteOffset: page.words[2 * i], checksum: page.words[2 * i + 1]), kind: kind, level: level - 1,
                        base: PageLayout.childBase(base, index: i, kind: kind, level: level), pages: pages,
                        visited: &visited, revisits: &revisits, body)
        }
    }

    // MARK: Volume table and references

    /// Checks names, ids, origins and sizes against the maps; returns every block id a
    /// map names, with its count of distinct leaves (the derived refcount).
    private mutating func checkVolumeTable(_ sb: Superblock, _ root: CheckpointRoot, _ pages: [UInt64: CheckedPage]) -> BlockReferences {
        var names: Set<String> = [], ids: Set<UInt64> = []
        for volume in root.volumes {
            if !names.insert(volume.name).inserted {
                add(.error, "volume-table", "checkpoint", sb.checkpointByteOffset, "volume name \"\(volume.name)\" appears twice")
            }
            if !ids.insert(volume.id).inserted || volume.id == 0 || volume.id >= root.nextVolumeID {
                add(.error, "volume-table", "checkpoint", sb.checkpointByteOffset,
                    "volume \"\(volume.name)\" has id \(volume.id): duplicate, zero or not below the next id \(root.nextVolumeID)")
            }
            if volume.originID != 0 && volume.originID >= root.nextVolumeID {
                add(.error, "volume-table", "checkpoint", sb.checkpointByteOffset,
                    "volume \"\(volume.name)\" names origin id \(volume.originID), which was never allocated")
            }
            let blockCount = volume.sizeByteCount / UInt64(sb.geometry.blockByteCount)
            var beyond = 0
            var visited = Set<UInt64>(), revisits = 0
            forEachLeaf(volume.mapRoot, kind: .map, level: volume.mapHeight - 1, base: 0, pages: pages,
                        visited: &visited, revisits: &revisits) { base, words in
                for (slot, id) in words.enumerated() where id != 0 && (base >= blockCount || UInt64(slot) >= blockCount - base) {
                    beyond += 1
                }
            }
            if revisits > 0 {
                add(.error, "page-shared-wrongly", "map of \(volume.name)", volume.mapRoot.byteOffset,
                    "\(revisits) references to pages already reached within this one map (a page may be shared between volumes, not within one)")
            }
            if beyond > 0 {
                add(.error, "volume-table", "map of \(volume.name)", volume.mapRoot.byteOffset,
                    "\(beyond) blocks mapped beyond the volume's size of \(volume.sizeByteCount) bytes")
            }
        }
        // C-11: a queued map holds nothing below the bound its release steps reached.
        for queued in root.releaseQueue {
            var early = 0
            var visited = Set<UInt64>(), revisits = 0
            forEachLeaf(queued.mapRoot, kind: .map, level: queued.mapHeight - 1, base: 0, pages: pages,
                        visited: &visited, revisits: &revisits) { base, words in
                for (slot, id) in words.enumerated() where id != 0 && base &+ UInt64(slot) < queued.releasedSlotCount { early += 1 }
            }
            if revisits > 0 {
                add(.error, "page-shared-wrongly", "queued map \(queued.id)", queued.mapRoot.byteOffset,
                    "\(revisits) references to pages already reached within this one map")
            }
            if early > 0 {
                add(.error, "volume-table", "queued map \(queued.id)", queued.mapRoot.byteOffset,
                    "\(early) blocks mapped below the \(queued.releasedSlotCount) slots its release steps already released (FORMAT C-11)")
            }
        }
        // Refcounts: distinct leaves naming each id (shared leaves count once), by id
        // below the limit (bounded by the pool's size, FORMAT C-5); ids at or above it
        // are collected apart. Queued maps of deleted volumes count: their blocks stay
        // referenced until released.
        var refcounts = [UInt32](repeating: 0, count: Int(root.blockIDLimit))
        var beyondLimit: [UInt64] = []
        for page in pages.values where page.kind == .map && page.level == 0 {
            for id in page.words where id != 0 {
                if id < root.blockIDLimit { refcounts[Int(id)] &+= 1 } else { beyondLimit.append(id) }
            }
        }
        report.referencedBlockCount = refcounts.reduce(0) { $0 + ($1 > 0 ? 1 : 0) } + Set(beyondLimit).count
        return BlockReferences(refcounts: refcounts, beyondLimit: beyondLimit)
    }

    /// Every referenced id must have a valid block-table entry below the id limit.
    /// Returns the entries of the referenced ids that are valid, indexed by id (others
    /// hold a zero-length location).
    private mutating func checkBlockTable(_ sb: Superblock, _ root: CheckpointRoot, _ pages: [UInt64: CheckedPage],
                                          references: BlockReferences) -> [BlockLocation] {
        let absent = BlockLocation(byteOffset: 0, storedByteCount: 0, flags: 0, checksum: 0)
        var entries = [BlockLocation](repeating: absent, count: references.refcounts.count)
        var present = [Bool](repeating: false, count: references.refcounts.count)
        let fanout = PageLayout.blockTableLeafFanout
        var visited = Set<UInt64>(), revisits = 0
        forEachLeaf(root.blockTableRoot, kind: .blockTable, level: root.blockTableHeight - 1, base: 0, pages: pages,
                    visited: &visited, revisits: &revisits) { base, words in
            guard base < UInt64(entries.count) else { return }
            for slot in 0..<fanout {
                let id = Int(base) + slot
                guard id < entries.count, references.refcounts[id] > 0 else { continue }
                let w = slot * 3
                entries[id] = BlockLocation(byteOffset: words[w], storedByteCount: UInt32(truncatingIfNeeded: words[w + 1]),
                                            flags: UInt32(truncatingIfNeeded: words[w + 1] >> 32), checksum: words[w + 2])
                present[id] = true
            }
        }
        var missing: [UInt64] = Array(Set(references.beyondLimit)).sorted(), invalid: [UInt64] = []
        for id in 1..<max(entries.count, 1) where references.refcounts[id] > 0 {
            guard present[id] else { missing.append(UInt64(id)); continue }
            let location = entries[id]
            guard location.storedByteCount > 0, location.storedByteCount <= sb.geometry.blockByteCount,
                  location.flags & ~BlockLocation.flagCompressed == 0,
                  sb.geometry.isValidExtent(byteOffset: location.byteOffset, byteCount: location.allocatedByteCount)
            else { invalid.append(UInt64(id)); entries[id] = absent; continue }
        }
        if !missing.isEmpty {
            add(.error, "block-missing", "block table", sb.checkpointByteOffset,
                "\(missing.count) block ids named by maps have no entry (unreadable page or beyond the id limit \(root.blockIDLimit)), first: \(missing.prefix(5).map(String.init).joined(separator: ", "))")
        }
        if !invalid.isEmpty {
            add(.error, "block-entry-invalid", "block table", sb.checkpointByteOffset,
                "\(invalid.count) referenced block ids have an invalid location, first: \(invalid.prefix(5).map(String.init).joined(separator: ", "))")
        }
        return entries
    }

    /// No two referenced things overlap; per-segment live bytes rebuilt equal the stored
    /// ones (leaks and accounting errors counted apart); the reserve is free.
    /// Returns the rebuilt live bytes per segment.
    private mutating func checkExtentsAndUsage(_ sb: Superblock, _ root: CheckpointRoot, _ pages: [UInt64: CheckedPage],
                                               entries: [BlockLocation]) -> [UInt64] {
        let geometry = sb.geometry
        // `id` 0 marks a page, UInt64.max the root (block ids are neither).
        var extents: [(start: UInt64, count: UInt64, id: UInt64)] = []
        extents.reserveCapacity(entries.count + pages.count + 1)
        for (id, location) in entries.enumerated() where location.storedByteCount > 0 {
            extents.append((location.byteOffset, location.allocatedByteCount, UInt64(id)))
        }
        for offset in pages.keys { extents.append((offset, UInt64(PoolGeometry.pageByteCount), 0)) }
        extents.append((sb.checkpointByteOffset, sectorAligned(sb.checkpointByteCount), .max))
        extents.sort { $0.start < $1.start }
        func what(_ e: (start: UInt64, count: UInt64, id: UInt64)) -> String {
            (e.id == 0 ? "page" : e.id == .max ? "checkpoint root" : "block \(e.id)") + " at \(e.start)"
        }
        var overlaps = 0
        var firstOverlap = ""
        for i in 1..<max(extents.count, 1) where extents[i].start < extents[i - 1].start + extents[i - 1].count {
            overlaps += 1
            if firstOverlap.isEmpty { firstOverlap = "\(what(extents[i - 1])) and \(what(extents[i]))" }
        }
        if overlaps > 0 {
            add(.error, "extent-overlap", "block table", sb.checkpointByteOffset,
                "\(overlaps) pairs of referenced extents share bytes, first: \(firstOverlap)")
        }
        // C-8: from the stored append point to its segment's end nothing is referenced
        // (a clean open appends there).
        if root.resumeByteOffset != 0, let s = geometry.segmentIndex(containing: root.resumeByteOffset) {
            let end = geometry.segmentByteOffset(s) + UInt64(geometry.segmentByteCount)
            if let inside = extents.first(where: { $0.start + $0.count > root.resumeByteOffset && $0.start < end }) {
                add(.error, "resume-point-referenced", "checkpoint", sb.checkpointByteOffset,
                    "the root resumes appends at byte offset \(root.resumeByteOffset), but \(what(inside)) lies between there and its segment's end \(end): a clean open would write over it")
            }
        }
        var rebuilt = [UInt64](repeating: 0, count: Int(geometry.segmentCount))
        for extent in extents {
            if let s = geometry.segmentIndex(containing: extent.start) { rebuilt[s] += extent.count }
        }
        // With a subtree unreadable the rebuilt figures miss its pages and blocks: the
        // comparison would only echo that damage as leaks.
        let unreadable = report.findings.filter { $0.code == "page-damaged" || $0.code == "page-pointer-invalid" || $0.code == "refcounts-damaged" }.count
        if unreadable > 0 {
            add(.info, "usage-not-checked", "segment usage", nil,
                "leaks not checked: \(unreadable) pages are unreadable, so the rebuilt figures miss what they reference")
        }
        for s in 0..<rebuilt.count where rebuilt[s] != root.segmentLiveByteCounts[s] {
            let stored = root.segmentLiveByteCounts[s]
            let offset = geometry.segmentByteOffset(s)
            if stored > UInt64(geometry.segmentByteCount) {
                add(.error, "usage-invalid", "segment usage", offset,
                    "segment \(s): stored \(stored) live bytes, more than the segment's \(geometry.segmentByteCount)", repairable: true)
            } else if stored > rebuilt[s] {
                // Unreadable pages can only make the rebuilt figure too low: no leak is
                // certain then, but an accounting error still is.
                guard unreadable == 0 else { continue }
                report.leakedSegmentCount += 1
                report.leakedByteCount += stored - rebuilt[s]
                add(.error, "leak", "segment usage", offset,
                    "segment \(s): stored \(stored) live bytes, rebuilt \(rebuilt[s]): \(stored - rebuilt[s]) bytes counted that nothing references",
                    repairable: true)
            } else {
                report.accountingErrorSegmentCount += 1
                report.accountingErrorByteCount += rebuilt[s] - stored
                add(.error, "accounting-error", "segment usage", offset,
                    "segment \(s): stored \(stored) live bytes, rebuilt \(rebuilt[s])\(stored == 0 ? " (free in the stored table but referenced)" : ""): \(rebuilt[s] - stored) referenced bytes not counted",
                    repairable: true)
            }
        }
        // The reserve is bytes the engine keeps unwritten (COMMIT §5.1, A-2): free
        // segments and the usable holes of used ones (dead runs trimmed to whole 4 KiB
        // units, counted in units of the largest extent), as the engine counts them.
        // Counting free segments only warned on healthy full pools whose holes hold it.
        let free = rebuilt.filter { $0 == 0 }.count
        let page = UInt64(PoolGeometry.pageByteCount)
        let unit = UInt64(max(Int(sb.geometry.blockByteCount), PoolGeometry.pageByteCount))
        var holeBytes: UInt64 = 0
        func addHole(_ from: UInt64, _ to: UInt64) {
            guard let hole = SegmentSpace.wholeUnits(from: from, to: to) else { return }
            let (start, end) = (hole.byteOffset, hole.byteOffset + hole.byteCount)
            let usableStart = (start + page - 1) & ~(page - 1)
            if end > usableStart { holeBytes += (end - usableStart) / unit * unit }
        }
        var cursor: [UInt64] = (0..<Int(geometry.segmentCount)).map { geometry.segmentByteOffset($0) + UInt64(PoolGeometry.segmentHeaderByteCount) }
        for extent in extents {
            guard let s = geometry.segmentIndex(containing: extent.start) else { continue }
            if extent.start > cursor[s] { addHole(cursor[s], extent.start) }
            cursor[s] = max(cursor[s], extent.start + extent.count)
        }
        for s in 0..<Int(geometry.segmentCount) where rebuilt[s] > 0 {
            addHole(cursor[s], geometry.segmentByteOffset(s) + UInt64(geometry.segmentByteCount))
        }
        let unwritten = UInt64(free) * geometry.segmentPayloadByteCount + holeBytes
        let reserve = UInt64(geometry.reserveSegmentCount) * UInt64(geometry.segmentByteCount)
        if unwritten < reserve {
            add(.warning, "reserve-short", "segment usage", nil,
                "\(free) free segments and \(holeBytes) bytes of usable holes, \(unwritten) unwritten, less than the reserve of \(reserve) (\(geometry.reserveSegmentCount) segments): the next checkpoint may need compaction first")
        }
        return rebuilt
    }

    /// The header of every segment holding referenced bytes names this pool and index.
    private mutating func checkSegmentHeaders(_ sb: Superblock, rebuilt: [UInt64]) throws {
        for s in 0..<Int(sb.geometry.segmentCount) where rebuilt[s] > 0 {
            let offset = sb.geometry.segmentByteOffset(s)
            // An unreadable header is a warning, like a damaged one: data is checked by its
            // own checksums, the header only identifies the segment to offline tools.
            guard let bytes = try read(SegmentHeaderLayout.byteCount, at: offset, "segment header", severity: .warning) else { continue }
            if bytes.allSatisfy({ $0 == 0 }) {
                // Headers are written unsynced with the segment's first data: a crash can
                // keep the data (its record and checksum are what count) and lose this.
                add(.info, "segment-header-missing", "segment header", offset,
                    "segment \(s) holds referenced data but its header sector is zero (not written before a crash, or zeroed)")
                continue
            }
            do {
                let header = try SegmentHeader.decode(bytes, byteOffset: offset)
                if header.poolUUID != sb.poolUUID || header.segmentIndex != UInt32(s) {
                    add(.warning, "segment-header", "segment header", offset,
                        "names segment \(header.segmentIndex) of pool \(header.poolUUID == sb.poolUUID ? "this pool" : "another pool"), expected segment \(s)")
                }
            } catch {
                add(.warning, "segment-header", "segment header", offset,
                    "\(error.detail) (the header only identifies the segment to offline tools; data is checked by its own checksums)")
            }
        }
    }

    // MARK: Journal

    /// Replays the journal as recovery would, read-only and in memory, and judges where
    /// it stopped: a torn tail (a crash during a sync: normal, repairable) versus damage
    /// inside synced space (a later record proves the lost ones had been synced).
    private mutating func checkJournal(_ sb: Superblock) -> Engine? {
        let engine: Engine
        do {
            // Usage rebuilt from the leaves (as repair's open does), not taken from the
            // root: the checks below then judge the replay, and a wrong stored figure is
            // reported once, as `leak` or `accounting-error` (checkSpace), not echoed as
            // an inconsistent recovered state.
            engine = try Engine.open(device: device, readOnly: true, salvage: true, rebuildCounts: true)
        } catch {
            // The checkpoint findings above say why; report that the journal went unchecked.
            add(.error, "journal-not-checked", "journal", PoolGeometry.journalByteOffset,
                "recovery cannot load this pool: \(error)")
            return nil
        }
        let recovery = engine.recoveryReport
        report.replayedRecordCount = recovery.replayedRecordCount
        report.replayStop = recovery.replayStopReason
        let stopOffset = PoolGeometry.journalByteOffset + UInt64(recovery.replayStopRingOffset)
        add(.info, "journal-replay", "journal", PoolGeometry.journalByteOffset + sb.journalReplayByteOffset,
            "replay starts at sequence \(sb.journalReplaySequence), applies \(recovery.replayedRecordCount) records and stops at byte offset \(stopOffset): \(recovery.replayStopReason)")
        if let lost = engine.laterSyncedRecord() {
            add(.error, "journal-synced-damage", "journal record", stopOffset,
                "replay stops at sequence \(recovery.replayStopSequence) (\(recovery.replayStopReason)), but record \(lost.sequence) at byte offset \(lost.byteOffset) was written after records up to \(lost.durable - 1) had been synced: synced changes from sequence \(recovery.replayStopSequence) on cannot be replayed")
        } else if recovery.replayStopWasTorn {
            add(.warning, "journal-torn-tail", "journal record", stopOffset,
                "torn tail (a crash during a sync): \(recovery.replayStopReason); the \(recovery.replayedRecordCount) records before it replay",
                repairable: true)
        }
        for finding in recovery.findings where !finding.hasPrefix("segment ") {
            add(.info, "recovery", "journal", nil, finding)
        }
        let problems = engine.checkInvariants()
        for problem in problems.prefix(20) {
            add(.error, "state-inconsistent", "recovered state", nil, problem)
        }
        if problems.count > 20 {
            add(.error, "state-inconsistent", "recovered state", nil, "and \(problems.count - 20) more inconsistencies of the same kind")
        }
        return engine
    }

    // MARK: Scrub

    /// Reads every live data block (of the recovered state when recovery could load the
    /// pool, else of the checkpoint) in file order, in large reads, and checks each one's
    /// XXH3; reports each damaged block with every owner.
    private mutating func scrub(_ sb: Superblock, engine: Engine?, pages: [UInt64: CheckedPage],
                                entries: [BlockLocation], progress: (@Sendable (ScrubProgress) -> Void)?) throws {
        var blocks: [(id: UInt64, location: BlockLocation)] = []
        if let engine {
            try engine.forEachLiveBlock { id, location in blocks.append((id, location)) }
        } else {
            for (id, location) in entries.enumerated() where location.storedByteCount > 0 { blocks.append((UInt64(id), location)) }
        }
        blocks.sort { $0.location.byteOffset < $1.location.byteOffset }
        // Windows of consecutive blocks, one read of at most 4 MiB each.
        var windows: [Range<Int>] = []
        var i = 0
        while i < blocks.count {
            let first = blocks[i].location.byteOffset
            var j = i + 1
            var end = first + UInt64(blocks[i].location.storedByteCount)
            while j < blocks.count, blocks[j].location.byteOffset >= end,
                  blocks[j].location.byteOffset + UInt64(blocks[j].location.storedByteCount) - first <= UInt64(ScrubWork.windowLimit) {
                end = blocks[j].location.byteOffset + UInt64(blocks[j].location.storedByteCount)
                j += 1
            }
            windows.append(i..<j)
            i = j
        }
        let total = blocks.reduce(UInt64(0)) { $0 + UInt64($1.location.storedByteCount) }
        let work = ScrubWork(device: device, blocks: blocks, windows: windows, blockByteCount: Int(sb.geometry.blockByteCount),
                             total: total, progress: progress)
        // Four reader threads (not a Dispatch pool, which runs one per core): checksums
        // overlap reads, and the disk sees several requests at once.
        let group = DispatchGroup()
        for _ in 0..<work.readerCount {
            group.enter()
            let thread = Thread {
                work.run()
                group.leave()
            }
            thread.start()
        }
        group.wait()
        report.scrubbedByteCount += work.doneByteCount
        progress?(ScrubProgress(doneByteCount: work.doneByteCount, totalByteCount: total, seconds: work.seconds))
        let damaged = work.damaged
        guard !damaged.isEmpty else { return }
        report.damagedBlockCount = damaged.count
        // Owners: every volume and snapshot whose map names a damaged id.
        var owners: [UInt64: [BlockOwner]] = [:]
        let blockSize = UInt64(sb.geometry.blockByteCount)
        if let engine {
            for volume in engine.volumes.values.sorted(by: { $0.record.name < $1.record.name }) {
                // A map leaf that cannot be read is reported by the page checks already.
                try? engine.forEachMapped(volume.map) { index, id in
                    if damaged[id] != nil { owners[id, default: []].append(BlockOwner(volume: volume.record.name, byteOffset: index * blockSize)) }
                }
            }
        }
        for (id, (location, detail)) in damaged.sorted(by: { $0.value.0.byteOffset < $1.value.0.byteOffset }) {
            add(.error, "data-damaged", location.isCompressed ? "compressed data block" : "data block", location.byteOffset,
                "block id \(id): \(detail)", owners: owners[id] ?? [])
        }
    }
}

/// The data reads of a scrub, shared by its worker threads: each claims the next window
/// in file order, reads it with one call into its own buffer and checks every block in
/// it. Several workers only on a device that allows concurrent access (FileDevice's
/// preads do); one otherwise.
///
/// Unchecked only for `device`: ``BlockDevice`` is not `Sendable`, because a device that
/// does not allow concurrent access (the crash simulator's) is used under the pool's lock
/// alone. Everything else is immutable or in `state`.
private final class ScrubWork: @unchecked Sendable {
    static let windowLimit = 4 << 20
    static let concurrentReaderCount = 4

    private let device: BlockDevice
    private let blocks: [(id: UInt64, location: BlockLocation)]
    private let windows: [Range<Int>]
    private let blockByteCount: Int
    private let total: UInt64
    private let progress: (@Sendable (ScrubProgress) -> Void)?
    private let started = Date()

    private struct State {
        var next = 0
        var lastReport = Date()
        var doneByteCount: UInt64 = 0
        var damaged: [UInt64: (BlockLocation, String)] = [:]
    }
    private let state = Mutex(State())
    /// Held while the progress sink runs, so calls never overlap; holds the largest
    /// figure reported, so a reader preempted after building its report cannot move
    /// the progress backwards.
    private let reporting = Mutex<UInt64>(0)

    var readerCount: Int { device.allowsConcurrentAccess ? Self.concurrentReaderCount : 1 }
    var doneByteCount: UInt64 { state.withLock { $0.doneByteCount } }
    var damaged: [UInt64: (BlockLocation, String)] { state.withLock { $0.damaged } }

    init(device: BlockDevice, blocks: [(id: UInt64, location: BlockLocation)], windows: [Range<Int>], blockByteCount: Int,
         total: UInt64, progress: (@Sendable (ScrubProgress) -> Void)?) {
        self.device = device
        self.blocks = blocks
        self.windows = windows
        self.blockByteCount = blockByteCount
        self.total = total
        self.progress = progress
    }

    var seconds: Double { Date().timeIntervalSince(started) }

    func run() {
        var buffer = [UInt8](repeating: 0, count: Self.windowLimit + 65536)
        var expanded = [UInt8](repeating: 0, count: blockByteCount)
        while true {
            let claimed: Int? = state.withLock {
                guard $0.next < windows.count else { return nil }
                $0.next += 1
                return $0.next - 1
            }
            guard let w = claimed else { return }
            let range = windows[w]
            let first = blocks[range.lowerBound].location.byteOffset
            let last = blocks[range.upperBound - 1].location
            let length = Int(last.byteOffset + UInt64(last.storedByteCount) - first)
            var found: [(UInt64, BlockLocation, String)] = []
            var bytes: UInt64 = 0
            var unreadable = Set<Int>()
            do {
                try buffer.withUnsafeMutableBytes { raw in
                    try device.read(into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<length]), at: first)
                }
            } catch {
                // A bad sector is what scrub is for: read the window's blocks one by one
                // and report the ones that fail, with the rest checked as usual.
                for k in range {
                    let location = blocks[k].location
                    let start = Int(location.byteOffset - first)
                    do {
                        try buffer.withUnsafeMutableBytes { raw in
                            try device.read(into: UnsafeMutableRawBufferPointer(rebasing: raw[start..<start + Int(location.storedByteCount)]),
                                            at: location.byteOffset)
                        }
                    } catch {
                        unreadable.insert(k)
                        found.append((blocks[k].id, location, "read failed: \(error)"))
                    }
                }
            }
            for k in range where !unreadable.contains(k) {
                let location = blocks[k].location
                let start = Int(location.byteOffset - first)
                let stored = start..<start + Int(location.storedByteCount)
                let sum = buffer.withUnsafeBytes { Checksum.xxh3(UnsafeRawBufferPointer(rebasing: $0[stored])) }
                if sum != location.checksum {
                    found.append((blocks[k].id, location, "checksum mismatch: expected \(hex(location.checksum)), found \(hex(sum))"))
                } else if location.isCompressed {
                    let ok = buffer.withUnsafeBytes { raw in
                        expanded.withUnsafeMutableBytes { BlockCompression.decompress(UnsafeRawBufferPointer(rebasing: raw[stored]), into: $0) }
                    }
                    if !ok { found.append((blocks[k].id, location, "checksum matches but the LZ4 data does not expand to one block")) }
                }
                bytes += UInt64(location.storedByteCount)
            }
            let report: ScrubProgress? = state.withLock {
                $0.doneByteCount += bytes
                for (id, location, detail) in found { $0.damaged[id] = (location, detail) }
                guard progress != nil, Date().timeIntervalSince($0.lastReport) >= 0.5 else { return nil }
                $0.lastReport = Date()
                return ScrubProgress(doneByteCount: $0.doneByteCount, totalByteCount: total, seconds: seconds)
            }
            // Outside the state's mutex: a slow progress sink must not stall the other
            // readers' claims.
            if let report, let progress {
                reporting.withLock { reported in
                    guard report.doneByteCount >= reported else { return }
                    reported = report.doneByteCount
                    progress(report)
                }
            }
        }
    }
}
