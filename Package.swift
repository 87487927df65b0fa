// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "LogPool",
    products: [
        .library(name: "LogPool", targets: ["LogPool"]),
        .executable(name: "logpool", targets: ["LogPoolCLI"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0")
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
        .executableTarget(
            name: "LogPoolCLI",
            dependencies: [
                "LogPool", "LogPoolTesting",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(name: "LogPoolFormatTests", dependencies: ["LogPoolFormat"]),
        .testTarget(name: "LogPoolTests", dependencies: ["LogPool", "LogPoolFormat", "LogPoolTesting"]),
        // Runs the built `logpool` binary; depending on the target makes `swift test` build it.
        .testTarget(name: "LogPoolCLITests", dependencies: ["LogPoolCLI"]),
    ]
)
