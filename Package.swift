// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "LogPool",
    products: [
        .library(name: "LogPool", targets: ["LogPool"]),
        .executable(name: "logpool", targets: ["LogPoolCLI"]),
        .executable(name: "logpool-sim", targets: ["LogPoolSim"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        // `logpool serve` only; the library does not depend on it.
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.0"),
    ],
    targets: [
        .systemLibrary(name: "CLZ4", pkgConfig: "liblz4", providers: [.apt(["liblz4-dev"])]),
        .systemLibrary(name: "CXXHash", pkgConfig: "libxxhash", providers: [.apt(["libxxhash-dev"])]),
        // The bytes on disk and nothing else: no I/O. Fuzzers link only this.
        .target(name: "LogPoolFormat", dependencies: ["CLZ4", "CXXHash"]),
        // The engine.
        .target(name: "LogPool", dependencies: ["LogPoolFormat"]),
        // Crash-injecting device, seeded generator, reference model: shared by tests and bench.
        .target(name: "LogPoolTesting", dependencies: ["LogPool"]),
        // Output plumbing and `main` shared by the two executables.
        .target(
            name: "LogPoolCLIKit",
            dependencies: ["LogPool", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        // The NBD server behind `logpool serve` (Specs/SERVE.md).
        .target(
            name: "LogPoolServe",
            dependencies: ["LogPool", .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio")]
        ),
        // The operator's `logpool`: no crash-simulation harness linked in.
        .executableTarget(
            name: "LogPoolCLI",
            dependencies: [
                "LogPool", "LogPoolCLIKit", "LogPoolServe",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // `logpool-sim`: crash simulation and process-kill torture.
        .executableTarget(
            name: "LogPoolSim",
            dependencies: [
                "LogPool", "LogPoolTesting", "LogPoolCLIKit",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(name: "LogPoolFormatTests", dependencies: ["LogPoolFormat"]),
        .testTarget(name: "LogPoolTests", dependencies: ["LogPool", "LogPoolFormat", "LogPoolTesting"]),
        // Runs the built `logpool` and `logpool-sim` binaries; depending on the targets makes
        // `swift test` build them. The library builds the hostile pool images it feeds them.
        .testTarget(name: "LogPoolCLITests", dependencies: ["LogPoolCLI", "LogPoolSim", "LogPool", "LogPoolTesting"]),
    ]
)
