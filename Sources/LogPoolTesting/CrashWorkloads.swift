import Foundation
import LogPool

/// Workloads the crash simulator runs (../shared/CRASH-TESTING.md §3.7), shared by the
/// tests and `logpool crashsim`.
public enum CrashWorkloads {
    /// The workload name an id carries: "random-512" or "random-4096" (the physical
    /// sector size of the simulated device).
    public static func randomName(physicalSectorByteCount: Int) -> String { "random-\(physicalSectorByteCount)" }

    /// Seeded random operations (writes of many sizes and alignments, discards,
    /// snapshots, clones, deletes, renames, resizes, syncs, checkpoints) on the 8 MiB test
    /// geometry (4 KiB blocks, 64 KiB segments; LZ4 for even seeds), with crash states
    /// enumerated at every sync after the pool is made. Returns the simulator with its
    /// figures. `only` restricts the run to one state (replay).
    public static func random(seed: UInt64, opCount: Int, physicalSectorByteCount: Int, samples: Int = 3,
                              only: CrashStateID? = nil, onViolation: ((CrashViolation) -> Void)? = nil) throws -> CrashSimulator {
        let device = SimulatedDevice(byteCount: 8 << 20)
        let pool = try Pool.create(on: device, capacity: 8 << 20, blockSize: 4096, segmentSize: 64 << 10,
                                   compression: seed % 2 == 0 ? .lz4 : .none)
        var model = ReferenceModel()
        try pool.createVolume(name: "a", size: 16 * 4096)
        model.create("a", size: 16 * 4096)
        try pool.createVolume(name: "b", size: 8 * 4096)
        model.create("b", size: 8 * 4096)
        try pool.sync()
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
            if device.syncCount > syncsBefore { simulator.madeDurableBeforeCurrentOp() }
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
}
