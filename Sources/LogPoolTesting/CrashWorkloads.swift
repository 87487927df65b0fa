import Foundation
import LogPool

/// Workloads the crash simulator runs (../shared/CRASH-TESTING.md §3.7), shared by the
/// tests and `logpool crashsim`.
public enum CrashWorkloads {
    /// The workload name an id carries: "random-512" or "random-4096" (the physical
    /// sector size of the simulated device).
    public static func randomName(physicalSectorByteCount: Int) -> String { "random-\(physicalSectorByteCount)" }

    /// The test geometry (8 MiB pool, 4 KiB blocks, 64 KiB segments; LZ4 for even seeds)
    /// with volumes "a" (16 blocks) and "b" (8 blocks), synced, and the matching model.
    static func testPool(seed: UInt64) throws -> (SimulatedDevice, Pool, ReferenceModel) {
        let device = SimulatedDevice(byteCount: 8 << 20)
        let pool = try Pool.create(on: device, capacity: 8 << 20, blockSize: 4096, segmentSize: 64 << 10,
                                   compression: seed % 2 == 0 ? .lz4 : .none)
        var model = ReferenceModel()
        try pool.createVolume(name: "a", size: 16 * 4096)
        model.create("a", size: 16 * 4096)
        try pool.createVolume(name: "b", size: 8 * 4096)
        model.create("b", size: 8 * 4096)
        try pool.sync()
        return (device, pool, model)
    }

    /// Seeded random operations (writes of many sizes and alignments, discards,
    /// snapshots, clones, deletes, renames, resizes, syncs, checkpoints) on the 8 MiB test
    /// geometry (4 KiB blocks, 64 KiB segments; LZ4 for even seeds), with crash states
    /// enumerated at every sync after the pool is made. Returns the simulator with its
    /// figures. `only` restricts the run to one state (replay).
    public static func random(seed: UInt64, opCount: Int, physicalSectorByteCount: Int, samples: Int = 3,
                              only: CrashStateID? = nil, onViolation: ((CrashViolation) -> Void)? = nil) throws -> CrashSimulator {
        var (device, pool, model) = try testPool(seed: seed)
        let simulator = CrashSimulator(seed: seed, workload: randomName(physicalSectorByteCount: physicalSectorByteCount),
                                       physicalSectorByteCount: physicalSectorByteCount, samples: samples, initial: model)
        simulator.only = only
        simulator.onViolation = onViolation
        simulator.attach(to: device)
        defer { device.beforeSync = nil }
        var workload = WorkloadGenerator(seed: seed)
        for _ in 0..<opCount {
            let op = workload.next(model)
            let syncsBefore = device.syncCount
            try apply(op, to: pool, model: &model)
            // A sync inside this op made everything before it durable.
            if device.syncCount > syncsBefore { simulator.madeDurable() }
            simulator.opFinished(op.description, model: model)
            if case .sync = op { simulator.madeDurable() }
            if case .checkpoint = op { simulator.madeDurable() }
            if let only, device.syncCount >= only.point { break }
        }
        let problems = pool.internalConsistencyProblems()
        if !problems.isEmpty {
            throw PoolError.invalidArgument("the live pool of seed \(seed) is inconsistent after the workload: \(problems.prefix(3))")
        }
        return simulator
    }

    /// Which device call a fault run fails.
    public enum Fault: String, Sendable {
        /// C9: the k-th write returns EIO.
        case writeError = "write-err"
        /// C8: the k-th sync returns EIO and the epoch's writes are lost (fsyncgate).
        case fsyncError = "fsync-eio"
    }

    /// The outcome of one fault run.
    public struct FaultOutcome: Sendable {
        /// The fault fired (the workload reached the k-th call).
        public var fired: Bool
        /// Violations, as "invariant: detail".
        public var violations: [String]
    }

    /// Runs the random workload of `seed` with the `k`-th write or sync failing, then
    /// checks (CRASH-TESTING §3.2 C8/C9, §3.5): the failing op throws a typed `io` error;
    /// the pool fails stop (every later call throws `poisoned`); the durable image then
    /// opens to a model state from the last durable op on; verify and scrub find nothing
    /// after that recovery.
    public static func fault(_ fault: Fault, at k: Int, seed: UInt64, opCount: Int) throws -> FaultOutcome {
        var (device, pool, model) = try testPool(seed: seed)
        var states = [logical(model)]
        var durableIndex = 0
        switch fault {
        case .writeError: device.failWriteAt = device.writeCount + k
        case .fsyncError: device.failSyncAt = device.syncCount + k
        }
        var workload = WorkloadGenerator(seed: seed)
        var violations: [String] = []
        var failedOp: String? = nil
        for _ in 0..<opCount {
            let op = workload.next(model)
            let syncsBefore = device.syncCount
            do {
                try apply(op, to: pool, model: &model)
            } catch PoolError.io {
                failedOp = op.description
                break
            } catch {
                violations.append("open: \(op) threw \(error), not io")
                failedOp = op.description
                break
            }
            if device.syncCount > syncsBefore { durableIndex = states.count - 1 }
            states.append(logical(model))
            if case .sync = op { durableIndex = states.count - 1 }
            if case .checkpoint = op { durableIndex = states.count - 1 }
        }
        guard let failedOp else { return FaultOutcome(fired: false, violations: violations) }
        // Fail-stop: nothing may be retried on this handle.
        do {
            try pool.sync()
            violations.append("fail-stop: sync after the failed \(failedOp) succeeded")
        } catch PoolError.poisoned {
        } catch {
            violations.append("fail-stop: sync after the failed \(failedOp) threw \(error), not poisoned")
        }
        // A crash now leaves the durable image.
        do {
            let recovered = SimulatedDevice(image: device.durable)
            let reopened = try Pool.open(on: recovered)
            let got = try contents(of: reopened)
            if !states[durableIndex...].contains(where: { $0 == got }) {
                violations.append("prefix: after the failed \(failedOp), the reopened pool matches no state from the last durable op on")
            }
            let report = try Pool.verify(on: SimulatedDevice(image: recovered.currentImage), scrubData: true)
            if !report.problems.isEmpty { violations.append("verify-after: \(report.problems.prefix(3))") }
        } catch {
            violations.append("open: reopening after the failed \(failedOp): \(error)")
        }
        return FaultOutcome(fired: true, violations: violations)
    }
}
