import Foundation
import LogPool
import LogPoolTesting
import Testing

/// A fresh pool on an in-memory device: 8 MiB, 4 KiB blocks, 64 KiB segments (the
/// crash-testing geometry), compression off unless asked.
func makePool(capacity: Int = 8 << 20, blockSize: Int = 4096, segmentSize: Int? = 64 << 10,
              compression: CompressionMode = .none) throws -> (Pool, SimulatedDevice) {
    let device = SimulatedDevice(byteCount: capacity)
    StrictVerify.register(device)
    let pool = try Pool.create(on: device, capacity: UInt64(capacity), blockSize: blockSize,
                               segmentSize: segmentSize, compression: compression)
    return (pool, device)
}

/// Reopens the device's current image (every write kept, as after kill -9 with a page
/// cache) on a new device.
func reopen(_ device: SimulatedDevice, image: [UInt8]? = nil, mode: OpenMode = .readWrite,
            metadataCacheBytes: Int = Pool.defaultMetadataCacheBytes) throws -> (Pool, SimulatedDevice) {
    let copy = SimulatedDevice(image: image ?? device.currentImage)
    return (try Pool.open(on: copy, mode: mode, metadataCacheBytes: metadataCacheBytes), copy)
}

func pattern(_ count: Int, seed: UInt8) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed) &* 7 &+ ($0 >> 8)) }
}

func expectPoolError(_ expected: (PoolError) -> Bool, _ comment: Comment? = nil,
                     sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> Void) {
    do {
        try body()
        Issue.record("expected an error, got none. \(comment?.rawValue ?? "")", sourceLocation: sourceLocation)
    } catch let error as PoolError {
        #expect(expected(error), "unexpected error \(error). \(comment?.rawValue ?? "")", sourceLocation: sourceLocation)
    } catch {
        Issue.record("non-PoolError \(error)", sourceLocation: sourceLocation)
    }
}

/// Writes `chunkByteCount`-byte patterns (seeded by chunk number) from offset 0 until the
/// pool answers `poolFull`; returns what the volume now holds.
func fillUntilPoolFull(_ volume: Volume, chunkByteCount: Int) throws -> [UInt8] {
    var model: [UInt8] = []
    while true {
        let data = pattern(chunkByteCount, seed: UInt8(truncatingIfNeeded: model.count / chunkByteCount))
        do {
            try volume.write(at: UInt64(model.count), from: data)
        } catch PoolError.poolFull {
            return model
        }
        model += data
    }
}

/// Strict mode: a suite with `.strictVerify` runs the checker on every pool that
/// `makePool` created during each of its tests, once the test is over. The device image
/// at that moment is what a crash there would leave (every write done, the unsynced
/// journal tail lost), so nothing the checker finds may be unrepairable; and once the
/// pool is closed, nothing may be found at all.
struct StrictVerify: TestTrait, SuiteTrait, TestScoping {
    var isRecursive: Bool { true }

    final class Registry: @unchecked Sendable {
        private let lock = NSLock()
        private var devices: [SimulatedDevice] = []
        func add(_ device: SimulatedDevice) { lock.withLock { devices.append(device) } }
        var all: [SimulatedDevice] { lock.withLock { devices } }
    }

    @TaskLocal static var current: Registry?

    static func register(_ device: SimulatedDevice) { current?.add(device) }

    func provideScope(for test: Test, testCase: Test.Case?, performing function: @Sendable () async throws -> Void) async throws {
        guard testCase != nil else { return try await function() }
        let registry = Registry()
        try await StrictVerify.$current.withValue(registry) { try await function() }
        for (i, device) in registry.all.enumerated() {
            let report = try Pool.verify(on: SimulatedDevice(image: device.currentImage), scrubData: true)
            let lasting = report.problems.filter { $0.severity == .error && !$0.repairable }
            #expect(lasting.isEmpty, "strict verify of pool \(i) after \(test.name): \(lasting.prefix(3))")
        }
    }
}

extension Trait where Self == StrictVerify {
    /// Verify (and scrub) every pool the test made, after the test.
    static var strictVerify: StrictVerify { StrictVerify() }
}
