plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "org.edgeft.chat"
    compileSdk = 35

    defaultConfig {
        applicationId = "org.edgeft.chat"
        // executorch-android declares minSdk 23 (extension/android/executorch_android/build.gradle).
        minSdk = 23
        targetSdk = 35
        versionCode = 1
        versionName = "0.1"
        // The AAR ships native libraries for these two ABIs only.
        ndk { abiFilters += listOf("arm64-v8a", "x86_64") }
    }

    buildTypes {
        release {
            isMinifyEnabled = false // R8 would need keep rules for the JNI callbacks (LlmCallback)
        }
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
}

dependencies {
    // LlmModule/LlmCallback and the native runtime (XNNPACK, optimized + quantized kernels, the LLM custom
    // ops the .pte's KV cache uses). The Maven artifact brings fbjni and soloader through its POM.
    implementation("org.pytorch:executorch-android:${property("executorchVersion")}")
}
