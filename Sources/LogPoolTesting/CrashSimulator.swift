import Foundation
import LogPool

/// Crash-state classes (Specs/CRASH-MODEL.md §2). C0–C7 are built from the
/// pending writes at each sync; C8/C9 re-run the workload with a fault switch.
public enum CrashClass: String, CaseIterable, Codable, Sendable {
    /// C0: the whole pending epoch is lost.
    case none
    /// C1: writes 1…i persisted whole.
    case prefix
    /// C2: writes 1…i−1 whole, write i torn: only its first s sectors, or only its last s.
    case torn
    /// C3: every write but one (reordering).
    case omitOne = "omit-one"
    /// C4: any subset of the epoch's sectors (sampled from ids).
    case subset
    /// C5: C4, and each lost sector a pending write targeted holds zeros or random bytes.
    case garbage
    /// C6: every write of the epoch whole, but one landed at another sector-aligned offset
    /// of its region (slot A↔B, ring position, other segment); its target keeps old bytes.
    case misdirect
    /// C7: a prefix of the epoch, then one bit flipped or one physical sector unreadable
    /// in a sector some write touched (or a superblock slot).
    case media
    /// C10: the recovery of a crash state, itself crashed at each of its own syncs
    /// (C0-C5 over recovery's writes); every re-recovery must reach the same state.
    case recoveryCrash = "recovery-crash"
    /// C11: the recovered pool runs more ops (writes, a checkpoint, a compaction) with
    /// C0-C5 crash states at every sync; nothing synced before the first crash is lost.
    case secondCrash = "second-crash"
    /// C12 (long mode): the previous sync lied: any subset of its epoch's writes is lost
    /// too, with any subset of the pending epoch. No trap, and a model state of any op
    /// or a typed error; durability is not promised.
    case lyingSync = "lying-sync"
    /// C8: the workload re-run with its `point`-th sync failing (EIO, epoch dropped).
    case fsyncEIO = "fsync-eio"
    /// C9: the workload re-run with its `point`-th write failing; index 0: EIO once,
    /// 1: a short write then ENOSPC, 2: ENOSPC from then on.
    case writeErr = "write-err"

    /// Classes whose damage is outside the crash model: a typed `corrupt`/`io` error is
    /// an allowed outcome, silent wrong or older data is not.
    public var isDamage: Bool { self == .misdirect || self == .media || self == .lyingSync }
    /// Classes made by re-running the workload with a failing call (C8, C9).
    public var isFault: Bool { self == .fsyncEIO || self == .writeErr }
}

/// The name of one crash state, `v1:seed:workload:point:class:index`: the workload's
/// seed and name, the crash point (the ordinal of the sync, 1-based), the class and the
/// index within it. Per-state randomness is derived by hashing the id, never drawn from
/// a shared generator, so one state replays alone and adding a class shifts no other.
public struct CrashStateID: Hashable, Codable, Sendable, CustomStringConvertible {
    public var seed: UInt64
    public var workload: String
    public var point: Int
    public var crashClass: CrashClass
    public var index: Int

    public init(seed: UInt64, workload: String, point: Int, crashClass: CrashClass, index: Int) {
        self.seed = seed
        self.workload = workload
        self.point = point
        self.crashClass = crashClass
        self.index = index
    }

    public var description: String { "v1:\(seed):\(workload):\(point):\(crashClass.rawValue):\(index)" }

    /// Parses the text `description` prints; nil for anything else.
    public init?(_ text: String) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
        guard parts.count == 6, parts[0] == "v1", let seed = UInt64(parts[1]), !parts[2].isEmpty,
              let point = Int(parts[3]), point >= 1, let crashClass = CrashClass(rawValue: parts[4]),
              let index = Int(parts[5]), index >= 0
        else { return nil }
        self.init(seed: seed, workload: parts[2], point: point, crashClass: crashClass, index: index)
    }

    /// A generator seeded from the id alone.
    var generator: SeededGenerator { SeededGenerator(seed: hash) }

    /// FNV-1a of the id's text: the state's own randomness, independent of any other.
    var hash: UInt64 {
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325
        for byte in description.utf8 { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01B3 }
        return hash
    }
}

/// What went wrong in one crash state.
public struct CrashViolation: Codable, Sendable, CustomStringConvertible {
    public var state: CrashStateID
    /// Which invariant (CRASH-MODEL §5): `open`, `prefix`, `verify-before`, `verify-after`,
    /// `invariants`, `idempotence`, `generation`.
    public var invariant: String
    public var detail: String

    public init(state: CrashStateID, invariant: String, detail: String) {
        self.state = state
        self.invariant = invariant
        self.detail = detail
    }

    public var description: String { "\(state) [\(invariant)] \(detail)" }
}

/// Figures of a crash-simulation run (CRASH-MODEL §9).
public struct CrashFigures: Codable, Sendable {
    public var crashPoints = 0
    public var generated: [String: Int] = [:]
    public var unique: [String: Int] = [:]
    public var recovered = 0
    /// Open times in milliseconds of the recovered states.
    public var openMilliseconds: [Double] = []
    public var replayedRecordsMax = 0
    /// Writes the write-time checks (W1-W4) looked at.
    public var checkedWrites = 0
    public var violations: [CrashViolation] = []
    public var violationCounts: [String: Int] = [:]
    /// Recovery outcomes: `ok`, `corrupt-reported` (a typed error in a C6/C7 state).
    public var outcomes: [String: Int] = [:]
    /// Coverage marks (CRASH-MODEL §8): named recovery and workload events, with hit counts.
    public var marks: [String: Int] = [:]
    /// Minimal reproducers of failing workloads (shrunk op lists), one line each.
    public var reproducers: [String] = []

    public init() {}

    // Open times are summarized (percentiles), not listed, in JSON.
    private enum CodingKeys: String, CodingKey {
        case crashPoints, generated, unique, recovered, replayedRecordsMax, checkedWrites, violations, violationCounts, outcomes, marks, reproducers
    }

    /// The marks a long run must hit (CRASH-MODEL §8).
    public static let requiredMarks: [String] = [
        "slot-A-chosen", "slot-B-chosen", "damaged-slot-reported",
        "replay-stop:clean-end", "replay-stop:torn-header", "replay-stop:stale-lap", "replay-stop:sequence-gap",
        "replay-stop:bad-record-checksum", "replay-stop:bad-data-checksum",
        "relocate-replayed", "relocate-discarded", "segment-header-rewritten",
        "journal-synced-damage-reported", "damage-reported-on-read",
        "checkpoint-on-full-pool", "pool-full", "large-exclusive-overwrite", "reopened-clean", "fsync-eio-fail-stop", "write-err-fail-stop",
        "refcounts-rebuilt", "release-queue-recovered",
    ]

    /// The marks a run with a tiny metadata cache (`--metadata-cache` up to 64 KiB) must
    /// hit too: memory pressure evicts and re-reads leaves and starts checkpoints.
    public static let cacheMarks: [String] = ["leaf-reread", "refcount-leaf-reread", "dirty-bound-checkpoint"]

    mutating func mark(_ name: String) { marks[name, default: 0] += 1 }

    public var generatedTotal: Int { generated.values.reduce(0, +) }
    public var uniqueTotal: Int { unique.values.reduce(0, +) }

    public func percentile(_ p: Double) -> Double {
        guard !openMilliseconds.isEmpty else { return 0 }
        let sorted = openMilliseconds.sorted()
        return sorted[min(sorted.count - 1, Int(Double(sorted.count - 1) * p))]
    }

    public mutating func merge(_ other: CrashFigures) {
        crashPoints += other.crashPoints
        for (k, v) in other.generated { generated[k, default: 0] += v }
        for (k, v) in other.unique { unique[k, default: 0] += v }
        recovered += other.recovered
        openMilliseconds += other.openMilliseconds
        replayedRecordsMax = max(replayedRecordsMax, other.replayedRecordsMax)
        checkedWrites += other.checkedWrites
        violations += other.violations
        for (k, v) in other.violationCounts { violationCounts[k, default: 0] += v }
        for (k, v) in other.outcomes { outcomes[k, default: 0] += v }
        for (k, v) in other.marks { marks[k, default: 0] += v }
        reproducers += other.reproducers
    }
}

/// Enumerates crash states at every sync a workload issues and checks each recovery
/// against the reference model (CRASH-MODEL §3, CRASH-MODEL §5): open returns a pool or a typed error;
/// the recovered logical state equals the model after some op between the last durable
/// one and the one in progress (prefix consistency, durability, snapshots included);
/// verify finds nothing unrepairable before recovery and nothing at all after it; the
/// engine's derived figures are consistent; a second open changes nothing; the
/// generation never goes back.
///
/// Use: attach to the workload's device (`device.beforeSync`), call ``opFinished(_:model:)``
/// after every op with the model, and ``madeDurable()`` when an op's sync completed.
public final class CrashSimulator {
    public let seed: UInt64
    public let workload: String
    /// Physical sector size of the simulated device: 512, or 4096 to garble the partly
    /// covered physical sectors of every write that did not persist whole.
    public let physicalSectorByteCount: Int
    /// C4/C5/C6/C7 samples per crash point.
    public let samples: Int
    /// C2 tears per write: both ends at s = 1…limit sectors (all of them when the write is
    /// shorter).
    public var tornLimit = 4
    /// Build C6/C7 states (off in the nested simulators of C10/C11, which keep to the
    /// crash model).
    public var damageClasses = true
    /// Run C10 and C11 from one recovered C0-C5 state in this many (0: never); states
    /// are picked by a hash of their id, so a replayed id repeats its compound checks.
    public var compoundEvery = 0
    /// Build C12 states (long mode).
    public var lyingSync = false
    /// Scrub (read every live block through verify) after one recovery in this many;
    /// reading the pool back through the engine already checks every block's checksum,
    /// so big pools scrub a sample.
    public var scrubEvery = 1
    private var checkedCount = 0
    /// Stop checking after this many violations (the first ones are the useful ones).
    public var violationLimit = 5
    /// When set, only this state is built and checked (replay).
    public var only: CrashStateID? = nil
    /// Called with each violation as it is found (replay prints details).
    public var onViolation: ((CrashViolation) -> Void)? = nil

    public private(set) var figures = CrashFigures()
    /// Logical states after each op; `durableIndex` is the last one a completed sync
    /// covers. States before `previousDurableIndex` keep only their digest (no recovery
    /// may legitimately reach them; the digest still names the op a lossy one reached).
    private var states: [RecordedState] = []

    struct RecordedState {
        var digest: UInt64
        var content: [String: ReferenceModel.Entry]?
    }

    private func record(_ model: ReferenceModel) -> RecordedState {
        let content = logical(model)
        return RecordedState(digest: Self.digest(content), content: content)
    }

    /// XXH3 over names, kinds and bytes in name order: two states are compared bytewise
    /// only when their digests agree.
    static func digest(_ content: [String: ReferenceModel.Entry]) -> UInt64 {
        var hashes: [UInt8] = []
        for (name, entry) in content.sorted(by: { $0.key < $1.key }) {
            hashes += Array(name.utf8) + [0, entry.isSnapshot ? 1 : 0]
            withUnsafeBytes(of: Checksum.xxh3(entry.bytes).littleEndian) { hashes += $0 }
        }
        return Checksum.xxh3(hashes)
    }

    /// The first index in `range` whose state equals `got` (digest, then bytes).
    private func match(_ got: [String: ReferenceModel.Entry], digest: UInt64, in range: Range<Int>) -> Int? {
        range.first { states[$0].digest == digest && (states[$0].content.map { Self.equal($0, got) } ?? true) }
    }

    /// Whether `got` is a state a recovery may reach now: one from the last durable op
    /// on, or the state the op in progress leaves (invariant 2: p ≤ the last op issued;
    /// a sync inside an op, after its record, can make the whole op durable).
    private func matchesLive(_ got: [String: ReferenceModel.Entry], digest: UInt64) -> Bool {
        if match(got, digest: digest, in: durableIndex..<states.count) != nil { return true }
        guard let inProgress else { return false }
        return inProgress.digest == digest && inProgress.content.map { Self.equal($0, got) } ?? false
    }

    /// The state the op now running will leave, when the workload said (``opStarting(_:)``).
    private var inProgress: RecordedState? = nil

    /// Tells the simulator the state the op about to run will leave if it succeeds, so a
    /// crash at a sync inside it may recover to that state.
    public func opStarting(_ model: ReferenceModel) {
        inProgress = record(model)
    }

    /// Logical states compared with `memcmp` (Array's `==` goes element by element).
    static func equal(_ a: [String: ReferenceModel.Entry], _ b: [String: ReferenceModel.Entry]) -> Bool {
        guard a.count == b.count else { return false }
        for (name, x) in a {
            guard let y = b[name], x.isSnapshot == y.isSnapshot, x.bytes.count == y.bytes.count else { return false }
            let same = x.bytes.withUnsafeBytes { p in y.bytes.withUnsafeBytes { q in
                p.count == 0 || memcmp(p.baseAddress!, q.baseAddress!, p.count) == 0
            } }
            if !same { return false }
        }
        return true
    }
    private var durableIndex = 0
    /// The durable index before the last one moved it: ops after it belong to the newest
    /// synced batch, which media damage can destroy without any later record proving it
    /// was synced (Specs/CRASHSIM.md, "unprovable last batch").
    private var previousDurableIndex = 0
    /// The newest valid slot of the durable image at the current crash point.
    private var durableSlot: Superblock? = nil
    /// A sync with pending writes was seen since `durableIndex` last moved.
    private var batchSeen = false
    /// Byte ranges of the writes synced since `durableIndex` last moved, and of those
    /// synced before that back to `previousDurableIndex`: the newest synced batch.
    private var currentBatchRanges: [Range<Int>] = []
    private var newestBatchRanges: [Range<Int>] = []
    public private(set) var opLog: [String] = []
    private var seenImages = Set<UInt64>()
    /// In replay mode (`only` set): the crash image of that state, for writing to a file.
    public private(set) var lastImage: [UInt8]? = nil

    public init(seed: UInt64, workload: String, physicalSectorByteCount: Int = 512, samples: Int = 3,
                initial model: ReferenceModel) {
        self.seed = seed
        self.workload = workload
        self.physicalSectorByteCount = physicalSectorByteCount
        self.samples = samples
        states = [record(model)]
    }

    /// Hooks the simulator into `device`'s syncs.
    /// and its writes (the write-time checks W1-W4, ``WriteChecks``).
    public func attach(to device: SimulatedDevice) {
        device.beforeSync = { [unowned self] device in self.crashPoint(device) }
        let checks = WriteChecks(physicalSectorByteCount: physicalSectorByteCount)
        checks.onViolation = { [unowned self, unowned device] check, detail in
            let id = CrashStateID(seed: seed, workload: workload, point: device.syncCount + 1, crashClass: .none, index: 0)
            violation(id, check, "\(detail); last ops: \(opLog.suffix(4))")
        }
        checks.attach(to: device)
        writeChecks = checks
    }

    /// Detaches from `device` (its hooks are cleared).
    public func detach(from device: SimulatedDevice) {
        figures.checkedWrites = writeChecks?.checkedWrites ?? figures.checkedWrites
        device.beforeSync = nil
        device.beforeWrite = nil
        device.afterSync = nil
        writeChecks = nil
    }

    private var writeChecks: WriteChecks? = nil

    /// Records that `op` completed and the model now holds its effect.
    public func opFinished(_ op: String, model: ReferenceModel) {
        opLog.append(op)
        states.append(record(model))
        inProgress = nil
    }

    /// The same, for a workload of ``Op`` values: they are kept, so a failing workload
    /// can be shrunk (``CrashWorkloads/shrink(_:seed:physicalSectorByteCount:invariant:seconds:configure:)``).
    public func opFinished(_ op: Op, model: ReferenceModel) {
        ops.append(op)
        opFinished(op.description, model: model)
    }

    /// The ops of the workload so far, when it recorded them.
    public private(set) var ops: [Op] = []

    /// An extra check run on every recovered C0-C5 state (tests of the harness itself).
    public var extraCheck: ((Pool) -> String?)? = nil

    /// Everything up to the newest recorded state is durable: call it after an op that
    /// synced, and also before ``opFinished(_:model:)`` of an op during which a sync
    /// completed (then everything before that op is durable).
    public func madeDurable() {
        guard states.count - 1 > durableIndex else { return }
        // Only a sync that wrote something starts a new "newest synced batch".
        if batchSeen {
            previousDurableIndex = durableIndex
            newestBatchRanges = currentBatchRanges
            currentBatchRanges = []
        }
        batchSeen = false
        durableIndex = states.count - 1
        for i in stride(from: previousDurableIndex - 1, through: 0, by: -1) {
            guard states[i].content != nil else { break }
            states[i].content = nil
        }
    }

    /// Counts a workload-side coverage mark (pool-full, checkpoint on a full pool).
    public func mark(_ name: String) { figures.mark(name) }

    private func violation(_ id: CrashStateID, _ invariant: String, _ detail: String) {
        let v = CrashViolation(state: id, invariant: invariant, detail: detail)
        figures.violationCounts[invariant, default: 0] += 1
        if figures.violations.count < violationLimit { figures.violations.append(v) }
        onViolation?(v)
    }

    // MARK: Building states

    private func crashPoint(_ device: SimulatedDevice) {
        figures.crashPoints += 1
        // Dedupe within a crash point: the same choice vector over another durable image
        // is another state.
        seenImages.removeAll(keepingCapacity: true)
        damageSites.removeAll(keepingCapacity: true)
        durableSlot = WriteChecks.newestSlot(device.durable)
        if !device.pending.isEmpty { batchSeen = true }
        let point = device.syncCount + 1
        if let only, only.point != point { return }
        guard figures.violations.count < violationLimit else { return }
        for (id, patches, unreadable) in states(of: device, point: point) {
            figures.generated[id.crashClass.rawValue, default: 0] += 1
            guard seenImages.insert(key(patches, unreadable)).inserted || only != nil else { continue }
            figures.unique[id.crashClass.rawValue, default: 0] += 1
            check(id, patches, unreadable: unreadable, device: device)
        }
        currentBatchRanges += device.pending.map { $0.byteOffset..<$0.byteOffset + $0.bytes.count }
    }

    /// A crash state as patches over the durable image: (byte offset, bytes), applied in
    /// order. Building one costs what the crash keeps, not the image size.
    typealias Patches = [(byteOffset: Int, bytes: [UInt8])]

    /// Every state of this crash point, by class (C0–C3 exhaustive, C4–C7 sampled), with
    /// the 512-byte sectors that read as EIO (C7 only).
    private func states(of device: SimulatedDevice, point: Int) -> [(CrashStateID, Patches, [Int])] {
        let pending = device.pending
        let counts = device.pendingSectorCounts
        let n = counts.count
        var result: [(CrashStateID, Patches, [Int])] = []
        func addDamaged(_ crashClass: CrashClass, _ index: Int, _ build: (inout SeededGenerator) -> (Patches, [Int])) {
            let id = CrashStateID(seed: seed, workload: workload, point: point, crashClass: crashClass, index: index)
            if let only, only != id { return }
            var generator = id.generator
            let (patches, unreadable) = build(&generator)
            result.append((id, patches, unreadable))
        }
        func add(_ crashClass: CrashClass, _ index: Int, _ build: (inout SeededGenerator) -> Patches) {
            addDamaged(crashClass, index) { (build(&$0), []) }
        }
        func whole(_ i: Int) -> Range<Int> { 0..<counts[i] }
        // The sectors `kept` of each pending write; on a device with larger physical
        // sectors, the partly covered physical sectors of each write that did not persist
        // whole are garbage (read-modify-write), even bytes an earlier sync made durable.
        func patches(_ kept: [Range<Int>?], _ generator: inout SeededGenerator, garbleEdges: Bool = true) -> Patches {
            var result: Patches = []
            for (i, write) in pending.enumerated() {
                guard i < kept.count, let range = kept[i], !range.isEmpty else { continue }
                let lower = min(range.lowerBound * 512, write.bytes.count), upper = min(range.upperBound * 512, write.bytes.count)
                if lower < upper { result.append((write.byteOffset + lower, Array(write.bytes[lower..<upper]))) }
            }
            guard physicalSectorByteCount > 512, garbleEdges else { return result }
            let physical = physicalSectorByteCount
            for (i, write) in pending.enumerated() {
                if i < kept.count, let range = kept[i], range == whole(i) { continue }
                let start = write.byteOffset, end = write.byteOffset + write.bytes.count
                for edge in [start, end - 1] {
                    let sectorStart = edge / physical * physical
                    guard !(start <= sectorStart && end >= sectorStart + physical), sectorStart + physical <= device.durable.count else { continue }
                    result.append((sectorStart, (0..<physical).map { _ in UInt8.random(in: 0...255, using: &generator) }))
                }
            }
            return result
        }
        add(.none, 0) { patches([], &$0) }
        for i in 0..<n {
            add(.prefix, i) { patches((0...i).map(whole), &$0) }
        }
        var torn = 0
        for i in 0..<n where counts[i] > 1 {
            for s in 1..<min(counts[i], tornLimit + 1) {
                add(.torn, torn) { patches((0..<i).map(whole) + [0..<s], &$0) }
                torn += 1
                add(.torn, torn) { patches((0..<i).map(whole) + [(counts[i] - s)..<counts[i]], &$0) }
                torn += 1
            }
        }
        for i in 0..<n where n > 1 {
            add(.omitOne, i) { patches((0..<n).map { $0 == i ? nil : whole($0) }, &$0) }
        }
        guard n > 0 else { return result }
        for k in 0..<samples {
            add(.subset, k) { generator in
                let kept: [Range<Int>?] = counts.map { c in
                    switch Int.random(in: 0..<3, using: &generator) {
                    case 0: return nil
                    case 1: return 0..<c
                    default:
                        let a = Int.random(in: 0...c, using: &generator), b = Int.random(in: 0...c, using: &generator)
                        return min(a, b)..<max(a, b)
                    }
                }
                return patches(kept, &generator)
            }
            add(.garbage, k) { generator in
                let kept: [Range<Int>?] = counts.map { c in Bool.random(using: &generator) ? 0..<c : 0..<Int.random(in: 0...c, using: &generator) }
                var result = patches(kept, &generator)
                // Lost sectors of the writes that did not persist whole: zeros or random.
                for (i, write) in pending.enumerated() {
                    let keptSectors = kept[i] ?? 0..<0
                    for sector in 0..<counts[i] where !keptSectors.contains(sector) && Int.random(in: 0..<4, using: &generator) == 0 {
                        let start = write.byteOffset + sector * 512
                        let zero = Bool.random(using: &generator)
                        result.append((start, (0..<512).map { _ in zero ? 0 : UInt8.random(in: 0...255, using: &generator) }))
                    }
                }
                return result
            }
        }
        let geometry = durableSlot?.geometry
        for k in 0..<(damageClasses ? samples : 0) {
            // C6: every write whole except one, which landed elsewhere in its region.
            if let geometry {
                addDamaged(.misdirect, k) { generator in
                    let i = Int.random(in: 0..<n, using: &generator)
                    var result = patches((0..<n).map { $0 == i ? nil : whole($0) }, &generator, garbleEdges: false)
                    if let target = misdirectTarget(pending[i], geometry: geometry, &generator) {
                        result.append((target, pending[i].bytes))
                        damageSites[CrashStateID(seed: seed, workload: workload, point: point, crashClass: .misdirect, index: k)] = target..<target + pending[i].bytes.count
                    }
                    return (result, [])
                }
                // C6 of an earlier epoch (index samples + k): a write the last sync made
                // durable had landed elsewhere; its target keeps the bytes it held
                // before. The pending epoch is then lost or whole.
                if figures.crashPoints >= 2 && !device.previousEpoch.isEmpty {
                    addDamaged(.misdirect, Self.earlierEpochIndexBase + k) { generator in
                        let previous = device.previousEpoch
                        let write = previous[Int.random(in: 0..<previous.count, using: &generator)]
                        var result: Patches = [(write.byteOffset, write.before)]
                        damageSites[CrashStateID(seed: seed, workload: workload, point: point, crashClass: .misdirect,
                                                 index: Self.earlierEpochIndexBase + k)] = write.byteOffset..<write.byteOffset + write.bytes.count
                        if let target = misdirectTarget((write.byteOffset, write.bytes), geometry: geometry, &generator) {
                            result.append((target, write.bytes))
                        }
                        if Bool.random(using: &generator) {
                            result += patches((0..<n).map(whole), &generator, garbleEdges: false)
                        }
                        return (result, [])
                    }
                }
            }
            // C12: the previous sync lied. Revert a random subset of its writes to the
            // bytes before them, then keep a random subset of the pending writes.
            if lyingSync && figures.crashPoints >= 2 && !device.previousEpoch.isEmpty {
                addDamaged(.lyingSync, k) { generator in
                    var result: Patches = []
                    let previous = device.previousEpoch
                    let kept = previous.map { _ in Bool.random(using: &generator) }
                    for write in previous { result.append((write.byteOffset, write.before)) }
                    for (i, write) in previous.enumerated() where kept[i] { result.append((write.byteOffset, write.bytes)) }
                    let keptNow: [Range<Int>?] = counts.map { c in Bool.random(using: &generator) ? 0..<c : nil }
                    return (result + patches(keptNow, &generator, garbleEdges: false), [])
                }
            }
            // C7: a prefix of the epoch, then one bit flipped or one physical sector
            // unreadable where some write landed (a quarter of the time in a slot).
            addDamaged(.media, k) { generator in
                let i = Int.random(in: -1..<n, using: &generator)
                var result = patches(i < 0 ? [] : (0...i).map(whole), &generator)
                let sector: Int
                if Int.random(in: 0..<4, using: &generator) == 0 || device.touchedSectors.isEmpty {
                    sector = Int(PoolGeometry.superblockSlotByteOffsets[Int.random(in: 0..<2, using: &generator)]) / 512
                } else {
                    sector = device.touchedSectors[Int.random(in: 0..<device.touchedSectors.count, using: &generator)]
                }
                let perPhysical = physicalSectorByteCount / 512
                let first = sector / perPhysical * perPhysical
                damageSites[CrashStateID(seed: seed, workload: workload, point: point, crashClass: .media, index: k)] = first * 512..<(first + perPhysical) * 512
                guard Bool.random(using: &generator) else {
                    return (result, Array(first..<first + perPhysical))
                }
                var content = sectorContent(sector, durable: device.durable, patches: result)
                let bit = Int.random(in: 0..<(512 * 8), using: &generator)
                content[bit / 8] ^= UInt8(1 << (bit % 8))
                result.append((sector * 512, content))
                return (result, [])
            }
        }
        return result
    }

    /// C6 states of the earlier-epoch variant have indexes from here (replay ids keep
    /// their meaning whatever the sample count).
    public static let earlierEpochIndexBase = 1000

    /// The byte range each C6/C7 state damaged (its misdirect target, the misdirected
    /// synced write's place, the damaged physical sector), for the exemption below.
    private var damageSites: [CrashStateID: Range<Int>] = [:]

    /// Whether a damage state's damage lies in the newest synced batch (the writes
    /// synced since the op-level durable point before the last one, including this op's
    /// own earlier syncs), outside the superblock slots: only such a loss is unprovable
    /// (FORMAT J-7); a lost slot has the other one, and anything older has a later
    /// record or a checksum to tell.
    private func damageTouchesNewestBatch(_ id: CrashStateID, device: SimulatedDevice) -> Bool {
        guard let site = damageSites[id], site.lowerBound >= Int(PoolGeometry.journalByteOffset) else { return false }
        return (newestBatchRanges + currentBatchRanges).contains { site.overlaps($0) }
    }

    /// Where a misdirected copy of `write` lands: the other superblock slot; another
    /// physical-sector-aligned place in the journal ring; the same offset in another
    /// segment. Nil when the region has no other place (or the write spans regions).
    private func misdirectTarget(_ write: (byteOffset: Int, bytes: [UInt8]), geometry: PoolGeometry,
                                 _ generator: inout SeededGenerator) -> Int? {
        let start = write.byteOffset, end = write.byteOffset + write.bytes.count
        let slots = PoolGeometry.superblockSlotByteOffsets.map { Int($0) }
        let ring = Int(PoolGeometry.journalByteOffset)..<Int(PoolGeometry.journalByteOffset + geometry.journalByteCount)
        let data = Int(geometry.dataAreaByteOffset)..<Int(geometry.dataAreaEndByteOffset)
        if end <= ring.lowerBound {
            let index = start >= slots[1] ? 1 : 0
            return start - slots[index] + slots[1 - index]
        }
        if ring.contains(start), end <= ring.upperBound {
            let places = (ring.count - write.bytes.count) / physicalSectorByteCount
            guard places > 1 else { return nil }
            let target = ring.lowerBound + Int.random(in: 0...places, using: &generator) * physicalSectorByteCount
            return target == start ? nil : target
        }
        if data.contains(start), end <= data.upperBound {
            let segment = Int(geometry.segmentByteCount)
            let count = Int(geometry.segmentCount)
            guard count > 1 else { return nil }
            let from = (start - data.lowerBound) / segment
            let to = (from + Int.random(in: 1..<count, using: &generator)) % count
            let target = start + (to - from) * segment
            return target + write.bytes.count <= data.upperBound ? target : nil
        }
        return nil
    }

    /// The 512 bytes of `sector` in the durable image with `patches` applied.
    private func sectorContent(_ sector: Int, durable: [UInt8], patches: Patches) -> [UInt8] {
        let lower = sector * 512, upper = lower + 512
        var content = Array(durable[lower..<min(upper, durable.count)])
        content += [UInt8](repeating: 0, count: 512 - content.count)
        for patch in patches where patch.byteOffset < upper && patch.byteOffset + patch.bytes.count > lower {
            let from = max(lower, patch.byteOffset), to = min(upper, patch.byteOffset + patch.bytes.count)
            content.replaceSubrange((from - lower)..<(to - lower), with: patch.bytes[(from - patch.byteOffset)..<(to - patch.byteOffset)])
        }
        return content
    }

    /// A key for deduplication: the patches' offsets and bytes (the choice vector).
    private func key(_ patches: Patches, _ unreadable: [Int]) -> UInt64 {
        var bytes: [UInt8] = []
        for sector in unreadable { withUnsafeBytes(of: UInt64(sector).littleEndian) { bytes += $0 } }
        bytes.append(0xEE)
        bytes.reserveCapacity(patches.reduce(0) { $0 + $1.bytes.count + 8 })
        for patch in patches {
            withUnsafeBytes(of: UInt64(patch.byteOffset).littleEndian) { bytes += $0 }
            bytes += patch.bytes
        }
        return Checksum.xxh3(bytes)
    }

    // MARK: Checking one state

    private func check(_ id: CrashStateID, _ patches: Patches, unreadable: [Int], device: SimulatedDevice) {
        let durableGeneration = durableSlot?.generation ?? 0
        let crashed = OverlayDevice(base: device.durable, patches: patches)
        crashed.unreadableSectors = Set(unreadable)
        lastImage = only == nil ? nil : crashed.image
        if id.crashClass.isDamage { return checkDamaged(id, crashed, device: device) }
        do {
            let before = try Pool.verify(on: crashed)
            let lasting = before.problems.filter { $0.severity == .error && !$0.repairable }
            if !lasting.isEmpty { violation(id, "verify-before", "\(lasting.prefix(3))") }
            let recoveredDevice = crashed.fork()
            let started = Date()
            let pool = try Pool.open(on: recoveredDevice)
            figures.openMilliseconds.append(Date().timeIntervalSince(started) * 1000)
            figures.recovered += 1
            figures.outcomes["ok", default: 0] += 1
            mark(pool.recoveryReport)
            // Recovered with a deleted volume's map still being released (COMMIT §5.4).
            if pool.stats.deletedMapsReleasing > 0 { figures.mark("release-queue-recovered") }
            figures.replayedRecordsMax = max(figures.replayedRecordsMax, pool.recoveryReport.replayedRecordCount)
            let got = try contents(of: pool)
            // Reading everything created the leaves of level-1 nodes shared by maps
            // (COMMIT §3.2); the invariant check below compares their parent counts.
            if pool.cacheEvents.sharedLeafCreations > 0 { figures.mark("shared-leaves-created") }
            if !matchesLive(got, digest: Self.digest(got)) {
                violation(id, "prefix", "recovered state matches no state from op \(durableIndex) to \(states.count - 1) (the durable one and later): \(firstDifference(got, states[durableIndex].content ?? [:])) (against op \(durableIndex)); last ops: \(opLog.suffix(6))")
            }
            // A cleanly closed slot with nothing to replay is not committed at open
            // (COMMIT §4 step 7): its generation may stay; any other recovery commits.
            let report = pool.recoveryReport
            let mustCommit = report.wasMounted || report.replayedRecordCount > 0 || report.otherSlotProblem != nil
            if pool.stats.generation < durableGeneration || (mustCommit && pool.stats.generation == durableGeneration) {
                violation(id, "generation", "recovered generation \(pool.stats.generation), the durable image already had \(durableGeneration)")
            }
            let problems = pool.internalConsistencyProblems()
            if !problems.isEmpty { violation(id, "invariants", "\(problems.prefix(3))") }
            if !pool.recoveryReport.findings.isEmpty { violation(id, "invariants", "recovery findings \(pool.recoveryReport.findings.prefix(3))") }
            // Every problem counts, warnings too, except `reserve-short`: it is about space,
            // not integrity, and a recovery on a nearly full pool may commit its checkpoint
            // into the reserve (what the reserve is for).
            try verifyAfter(id, recoveredDevice) { $0.code != "reserve-short" }
            if let problem = extraCheck?(pool) { violation(id, "extra", problem) }
            let again = try Pool.open(on: recoveredDevice.fork())
            if try !Self.equal(contents(of: again), got) { violation(id, "idempotence", "a second open reads different contents") }
            if compoundEvery > 0, id.hash % UInt64(compoundEvery) == 0 || only == id {
                compound(id, crashed: crashed, recovered: recoveredDevice, got: got)
            }
        } catch {
            violation(id, "open", "\(error); last ops: \(opLog.suffix(6))")
        }
    }

    /// A C6/C7 state: open and every read either succeed with a state of the model from
    /// the last durable op on, or fail with a typed `corrupt`/`io` error. A recovered state
    /// from before the last durable op (synced ops silently lost) or one matching no
    /// model state (silent wrong data) is a violation; so is an error finding after a
    /// recovery that read everything back correctly.
    private func checkDamaged(_ id: CrashStateID, _ crashed: OverlayDevice, device: SimulatedDevice) {
        func reported(_ error: any Error, _ when: String) -> Bool {
            guard let error = error as? PoolError else { return false }
            switch error {
            case .corrupt(let structure, _, _):
                figures.outcomes["corrupt-reported", default: 0] += 1
                if structure == "journal record" { figures.mark("journal-synced-damage-reported") }
                if when == "read" { figures.mark("damage-reported-on-read") }
                return true
            case .io(_, _, let offset):
                // Only the injected unreadable sectors may fail a read.
                guard crashed.unreadableSectors.contains(Int(offset) / 512) else { return false }
                figures.outcomes["corrupt-reported", default: 0] += 1
                if when == "read" { figures.mark("damage-reported-on-read") }
                return true
            default: return false
            }
        }
        let recoveredDevice = crashed.fork()
        let pool: Pool
        do {
            pool = try Pool.open(on: recoveredDevice)
        } catch {
            if !reported(error, "open") { violation(id, "open", "\(error); last ops: \(opLog.suffix(6))") }
            return
        }
        figures.recovered += 1
        mark(pool.recoveryReport)
        let got: [String: ReferenceModel.Entry]
        do {
            got = try contents(of: pool)
        } catch {
            if !reported(error, "read") { violation(id, "open", "reading the recovered pool: \(error)") }
            return
        }
        let digest = Self.digest(got)
        if id.crashClass == .lyingSync {
            // Durability is not promised: any state the model had, or a typed error.
            if (0..<states.count).contains(where: { states[$0].digest == digest }) || inProgress?.digest == digest {
                figures.outcomes["ok", default: 0] += 1
            } else {
                violation(id, "silent-wrong-data", "after a lying sync the pool reads back a state the model never had: \(firstDifference(got, states[durableIndex].content ?? [:])) (against op \(durableIndex)); last ops: \(opLog.suffix(6))")
            }
            return
        }
        if matchesLive(got, digest: digest) {
            figures.outcomes["ok", default: 0] += 1
            do {
                // Damage outside what was read may leave warnings; errors may not stay.
                try verifyAfter(id, recoveredDevice) { $0.severity == .error }
            } catch {
                violation(id, "verify-after", "\(error)")
            }
        } else if match(got, digest: digest, in: previousDurableIndex..<durableIndex) != nil
                    && damageTouchesNewestBatch(id, device: device) {
            // (A misdirected write of the newest synced batch can leave zeros where its
            // records were: a clean end, as unprovable as a torn tail.)
            // Damage to the newest synced batch looks exactly like a torn tail: no later
            // record proves the batch was synced. Counted, not a violation.
            figures.outcomes["lost-last-synced-batch", default: 0] += 1
        } else if let older = (0..<durableIndex).last(where: { states[$0].digest == digest }) {
            violation(id, "durability", "recovered the state after op \(older), but ops up to \(durableIndex) were synced; nothing reported the loss; recovery: \(pool.recoveryReport.replayStopReason); other slot: \(pool.recoveryReport.otherSlotProblem ?? "fine")")
        } else {
            violation(id, "silent-wrong-data", "the recovered pool reads back a state the model never had: \(firstDifference(got, states[durableIndex].content ?? [:])) (against the durable state, op \(durableIndex)); last ops: \(opLog.suffix(6))")
        }
    }

    /// The first difference between a recovered state and a model state: a name present
    /// in one only, a kind or size, or the first differing byte.
    private func firstDifference(_ got: [String: ReferenceModel.Entry], _ expected: [String: ReferenceModel.Entry]) -> String {
        for name in Set(got.keys).union(expected.keys).sorted() {
            guard let g = got[name] else { return "\(name) is missing" }
            guard let e = expected[name] else { return "\(name) exists but should not" }
            if g.isSnapshot != e.isSnapshot { return "\(name) is \(g.isSnapshot ? "a snapshot" : "a volume"), expected the other" }
            if g.bytes.count != e.bytes.count { return "\(name) is \(g.bytes.count) bytes, expected \(e.bytes.count)" }
            if let i = g.bytes.indices.first(where: { g.bytes[$0] != e.bytes[$0] }) {
                let end = min(g.bytes.count, i + 8)
                return "\(name) differs first at byte \(i): found \(g.bytes[i..<end].map { String($0, radix: 16) }), expected \(e.bytes[i..<end].map { String($0, radix: 16) })"
            }
        }
        return "no difference"
    }

    /// Verify (scrubbing one recovery in `scrubEvery`) after a recovery; the findings
    /// `counts` keeps are violations.
    private func verifyAfter(_ id: CrashStateID, _ recovered: OverlayDevice, counts: (Finding) -> Bool) throws {
        checkedCount += 1
        let after = try Pool.verify(on: recovered.fork(), scrubData: checkedCount % scrubEvery == 0 || only != nil)
        let problems = after.problems.filter(counts)
        if !problems.isEmpty { violation(id, "verify-after", "\(problems.prefix(3))") }
    }

    /// C10 and C11 from one recovered state.
    private func compound(_ id: CrashStateID, crashed: OverlayDevice, recovered: OverlayDevice, got: [String: ReferenceModel.Entry]) {
        func nested(_ crashClass: CrashClass, _ device: SimulatedDevice, model: ReferenceModel) -> CrashSimulator {
            let simulator = CrashSimulator(seed: seed, workload: "\(workload)/\(id.point).\(id.crashClass.rawValue).\(id.index)/\(crashClass.rawValue)",
                                           physicalSectorByteCount: physicalSectorByteCount, samples: 2, initial: model)
            simulator.damageClasses = false
            simulator.scrubEvery = scrubEvery
            simulator.attach(to: device)
            return simulator
        }
        func fold(_ crashClass: CrashClass, _ simulator: CrashSimulator) {
            figures.generated[crashClass.rawValue, default: 0] += simulator.figures.generatedTotal
            figures.unique[crashClass.rawValue, default: 0] += simulator.figures.uniqueTotal
            figures.recovered += simulator.figures.recovered
            figures.checkedWrites += simulator.figures.checkedWrites
            for (k, v) in simulator.figures.outcomes { figures.outcomes[k, default: 0] += v }
            for (k, v) in simulator.figures.marks { figures.marks[k, default: 0] += v }
            for v in simulator.figures.violations {
                violation(id, crashClass.rawValue, "\(v.state) [\(v.invariant)] \(v.detail)")
            }
        }
        // C10: recovery itself crashed at each of its syncs; every crash state of it must
        // recover to `got`, what the uninterrupted recovery read.
        let recoveryDevice = SimulatedDevice(image: crashed.image)
        let recovery = nested(.recoveryCrash, recoveryDevice, model: LogPoolTesting.model(of: got))
        do {
            let pool = try Pool.open(on: recoveryDevice)
            if try !Self.equal(contents(of: pool), got) { violation(id, CrashClass.recoveryCrash.rawValue, "recovery on a simulated device read differently") }
        } catch {
            violation(id, CrashClass.recoveryCrash.rawValue, "recovery on a simulated device failed: \(error)")
        }
        recovery.detach(from: recoveryDevice)
        fold(.recoveryCrash, recovery)
        // C11: the recovered pool keeps working through a second crash: more ops with a
        // checkpoint and a compaction, crash states at every sync.
        let secondDevice = SimulatedDevice(image: recovered.image)
        var model = LogPoolTesting.model(of: got)
        let second = nested(.secondCrash, secondDevice, model: model)
        do {
            var pool = try Pool.open(on: secondDevice)
            var workload = WorkloadGenerator(seed: id.hash)
            // Six random ops, a checkpoint, four more, a compaction, a sync; each random op
            // is drawn from the model as it is then, so it is valid.
            let shape: [Op?] = Array(repeating: nil, count: 6) + [.checkpoint] + Array(repeating: nil, count: 4) + [.compact, .sync]
            for planned in shape {
                let op = planned ?? workload.next(model)
                let syncsBefore = secondDevice.syncCount
                var after = model
                apply(op, to: &after)
                second.opStarting(after)
                do {
                    try apply(op, to: &pool, model: &model, reopen: { try Pool.open(on: secondDevice) })
                } catch PoolError.poolFull {
                    continue  // nothing changed (checked by the near-full workload)
                }
                if secondDevice.syncCount > syncsBefore { second.madeDurable() }
                second.opFinished(op.description, model: model)
                if op.isDurabilityPoint { second.madeDurable() }
            }
        } catch {
            violation(id, CrashClass.secondCrash.rawValue, "the recovered pool failed to keep working: \(error)")
        }
        second.detach(from: secondDevice)
        fold(.secondCrash, second)
    }

    /// Coverage marks of one recovery.
    private func mark(_ report: RecoveryReport) {
        figures.mark(report.chosenSlot == 0 ? "slot-A-chosen" : "slot-B-chosen")
        if report.otherSlotProblem != nil { figures.mark("damaged-slot-reported") }
        figures.mark("replay-stop:\(report.replayStopKind.rawValue)")
        if report.findings.contains(where: { $0.contains("live bytes") }) { figures.mark("usage-rebuilt") }
        if report.rebuiltRefcounts { figures.mark("refcounts-rebuilt") }
        if report.findings.contains(where: { $0.hasPrefix("replay continued") }) { figures.mark("replay-chained-epoch") }
        if report.replayedRelocateCount > 0 { figures.mark("relocate-replayed") }
        if report.discardedRelocate { figures.mark("relocate-discarded") }
        if report.rewrittenSegmentHeaders > 0 { figures.mark("segment-header-rewritten") }
    }
}
