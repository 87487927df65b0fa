import Foundation
import LogPool

/// Crash-state classes (../shared/CRASH-TESTING.md §3.2). C0–C5 are built from the
/// pending writes at each sync; the others need fault switches and come later.
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
    var generator: SeededGenerator {
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325
        for byte in description.utf8 { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01B3 }
        return SeededGenerator(seed: hash)
    }
}

/// What went wrong in one crash state.
public struct CrashViolation: Codable, Sendable, CustomStringConvertible {
    public var state: CrashStateID
    /// Which invariant (§3.5): `open`, `prefix`, `verify-before`, `verify-after`,
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

/// Figures of a crash-simulation run (§3.9).
public struct CrashFigures: Codable, Sendable {
    public var crashPoints = 0
    public var generated: [String: Int] = [:]
    public var unique: [String: Int] = [:]
    public var recovered = 0
    /// Open times in milliseconds of the recovered states.
    public var openMilliseconds: [Double] = []
    public var replayedRecordsMax = 0
    public var violations: [CrashViolation] = []
    public var violationCounts: [String: Int] = [:]

    public init() {}

    // Open times are summarized (percentiles), not listed, in JSON.
    private enum CodingKeys: String, CodingKey {
        case crashPoints, generated, unique, recovered, replayedRecordsMax, violations, violationCounts
    }

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
        violations += other.violations
        for (k, v) in other.violationCounts { violationCounts[k, default: 0] += v }
    }
}

/// Enumerates crash states at every sync a workload issues and checks each recovery
/// against the reference model (§3.3, §3.5): open returns a pool or a typed error;
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
    /// C4/C5 samples per crash point.
    public let samples: Int
    /// C2 tears per write: both ends at s = 1…limit sectors (all of them when the write is
    /// shorter).
    public var tornLimit = 4
    /// Stop checking after this many violations (the first ones are the useful ones).
    public var violationLimit = 5
    /// When set, only this state is built and checked (replay).
    public var only: CrashStateID? = nil
    /// Called with each violation as it is found (replay prints details).
    public var onViolation: ((CrashViolation) -> Void)? = nil

    public private(set) var figures = CrashFigures()
    /// Logical states after each op; `durableIndex` is the last one a completed sync covers.
    private var states: [[String: ReferenceModel.Entry]] = []
    private var durableIndex = 0
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
        states = [logical(model)]
    }

    /// Hooks the simulator into `device`'s syncs.
    public func attach(to device: SimulatedDevice) {
        device.beforeSync = { [unowned self] device in self.crashPoint(device) }
    }

    /// Records that `op` completed and the model now holds its effect.
    public func opFinished(_ op: String, model: ReferenceModel) {
        opLog.append(op)
        states.append(logical(model))
    }

    /// Everything up to the newest recorded state is durable: call it after an op that
    /// synced, and also before ``opFinished(_:model:)`` of an op during which a sync
    /// completed (then everything before that op is durable).
    public func madeDurable() {
        durableIndex = states.count - 1
    }

    private func violation(_ id: CrashStateID, _ invariant: String, _ detail: String) {
        let v = CrashViolation(state: id, invariant: invariant, detail: detail)
        figures.violationCounts[invariant, default: 0] += 1
        if figures.violations.count < violationLimit { figures.violations.append(v) }
        onViolation?(v)
    }

    // MARK: Building states

    private func crashPoint(_ device: SimulatedDevice) {
        figures.crashPoints += 1
        let point = device.syncCount + 1
        if let only, only.point != point { return }
        guard figures.violations.count < violationLimit else { return }
        for (id, patches) in states(of: device, point: point) {
            figures.generated[id.crashClass.rawValue, default: 0] += 1
            guard seenImages.insert(key(patches)).inserted || only != nil else { continue }
            figures.unique[id.crashClass.rawValue, default: 0] += 1
            check(id, patches, device: device)
        }
    }

    /// A crash state as patches over the durable image: (byte offset, bytes), applied in
    /// order. Building one costs what the crash keeps, not the image size.
    typealias Patches = [(byteOffset: Int, bytes: [UInt8])]

    /// Every state of this crash point, by class (C0–C3 exhaustive, C4/C5 sampled).
    private func states(of device: SimulatedDevice, point: Int) -> [(CrashStateID, Patches)] {
        let pending = device.pending
        let counts = device.pendingSectorCounts
        let n = counts.count
        var result: [(CrashStateID, Patches)] = []
        func add(_ crashClass: CrashClass, _ index: Int, _ build: (inout SeededGenerator) -> Patches) {
            let id = CrashStateID(seed: seed, workload: workload, point: point, crashClass: crashClass, index: index)
            if let only, only != id { return }
            var generator = id.generator
            result.append((id, build(&generator)))
        }
        func whole(_ i: Int) -> Range<Int> { 0..<counts[i] }
        // The sectors `kept` of each pending write; on a device with larger physical
        // sectors, the partly covered physical sectors of each write that did not persist
        // whole are garbage (read-modify-write), even bytes an earlier sync made durable.
        func patches(_ kept: [Range<Int>?], _ generator: inout SeededGenerator) -> Patches {
            var result: Patches = []
            for (i, write) in pending.enumerated() {
                guard i < kept.count, let range = kept[i], !range.isEmpty else { continue }
                let lower = min(range.lowerBound * 512, write.bytes.count), upper = min(range.upperBound * 512, write.bytes.count)
                if lower < upper { result.append((write.byteOffset + lower, Array(write.bytes[lower..<upper]))) }
            }
            guard physicalSectorByteCount > 512 else { return result }
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
        return result
    }

    /// A key for deduplication: the patches' offsets and bytes (the choice vector).
    private func key(_ patches: Patches) -> UInt64 {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(patches.reduce(0) { $0 + $1.bytes.count + 8 })
        for patch in patches {
            withUnsafeBytes(of: UInt64(patch.byteOffset).littleEndian) { bytes += $0 }
            bytes += patch.bytes
        }
        return Checksum.xxh3(bytes)
    }

    // MARK: Checking one state

    private func check(_ id: CrashStateID, _ patches: Patches, device: SimulatedDevice) {
        let candidates = Array(states[durableIndex...])
        let durableGeneration = newestGeneration(device.durable)
        let crashed = OverlayDevice(base: device.durable, patches: patches)
        lastImage = only == nil ? nil : crashed.image
        do {
            let before = try Pool.verify(on: crashed)
            let lasting = before.problems.filter { $0.severity == .error && !$0.repairable }
            if !lasting.isEmpty { violation(id, "verify-before", "\(lasting.prefix(3))") }
            let recoveredDevice = crashed.fork()
            let started = Date()
            let pool = try Pool.open(on: recoveredDevice)
            figures.openMilliseconds.append(Date().timeIntervalSince(started) * 1000)
            figures.recovered += 1
            figures.replayedRecordsMax = max(figures.replayedRecordsMax, pool.recoveryReport.replayedRecordCount)
            let got = try contents(of: pool)
            if !candidates.contains(where: { $0 == got }) {
                violation(id, "prefix", "recovered state matches no state from op \(durableIndex) to \(states.count - 1) (the durable one and later); last ops: \(opLog.suffix(6))")
            }
            if pool.stats.generation <= durableGeneration {
                violation(id, "generation", "recovered generation \(pool.stats.generation), the durable image already had \(durableGeneration)")
            }
            let problems = pool.internalConsistencyProblems()
            if !problems.isEmpty { violation(id, "invariants", "\(problems.prefix(3))") }
            if !pool.recoveryReport.findings.isEmpty { violation(id, "invariants", "recovery findings \(pool.recoveryReport.findings.prefix(3))") }
            let after = try Pool.verify(on: recoveredDevice.fork(), scrubData: true)
            if !after.problems.isEmpty { violation(id, "verify-after", "\(after.problems.prefix(3))") }
            let again = try Pool.open(on: recoveredDevice.fork())
            if try contents(of: again) != got { violation(id, "idempotence", "a second open reads different contents") }
        } catch {
            violation(id, "open", "\(error); last ops: \(opLog.suffix(6))")
        }
    }

    /// The highest generation of a valid slot in `image` (0 when none).
    private func newestGeneration(_ image: [UInt8]) -> UInt64 {
        var newest: UInt64 = 0
        for slot in 0..<2 {
            let offset = Int(PoolGeometry.superblockSlotByteOffsets[slot])
            guard image.count >= offset + PoolGeometry.superblockByteCount,
                  let sb = try? Superblock.decode(Array(image[offset..<offset + PoolGeometry.superblockByteCount]), slotIndex: slot)
            else { continue }
            newest = max(newest, sb.generation)
        }
        return newest
    }
}
